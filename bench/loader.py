"""Data loading headroom: `PretrainData` tokens/s against what a training step of the tiny CPU model consumes.

What is measured, in one process on the same cores:
  * loader: packed batches (batch x seq_len) drawn from a prepared dataset through
    `moxin_lightning.datamodules.PretrainData`
    (litdata `StreamingDataLoader`, shuffled, `--workers` reader processes), tokens/s over `--batches` batches
    after the first (which pays the reader start-up);
  * step: one optimizer step of `--preset` on the same batch shape: forward, fused head + cross-entropy,
    backward, AdamW — tokens/s, median of `--steps`.
The ratio loader / step says how many times faster than training the data arrives (goal >= 100x).

The dataset is prepared once from the built-in prose corpus with Mistral's 32K tokenizer (the `mistral_common`
wheel) unless `--data` names a prepared folder. Run:

    python bench/loader.py
    python bench/loader.py --workers 2 --seq 1024
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import statistics
import tempfile
import time
from pathlib import Path

import common
import torch

from moxin_lightning.data.prepare import prepare
from moxin_lightning.datamodules.pretrain import PretrainData
from moxin_lightning.losses import linear_cross_entropy
from moxin_lightning.model import ModelConfig, Transformer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="a prepared dataset folder (default: prepare builtin:prose)")
    parser.add_argument("--preset", default="moxin-tiny-9m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="bench/results/loader.jsonl")
    return parser.parse_args(argv)


def prepared_dataset(folder: str | None) -> str:
    if folder:
        return folder
    tokenizer = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    output = Path(tempfile.mkdtemp()) / "prose"
    prepare(["builtin:prose"], str(tokenizer), str(output), num_workers=2)
    return str(output)


def loader_tokens_per_s(data_dir: str, args: argparse.Namespace) -> float:
    data = PretrainData([data_dir], seq_len=args.seq, batch_size=args.batch, num_workers=args.workers, shuffle=True)
    data.setup("fit")
    iterator = iter(data.train_dataloader())
    next(iterator)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(iterator)
    return args.batches * args.batch * args.seq / (time.perf_counter() - start)


def step_tokens_per_s(args: argparse.Namespace) -> float:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(args.preset)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq + 1))
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        loss_sum, count = linear_cross_entropy(model.hidden_states(ids[:, :-1]), model.lm_head.weight, ids[:, 1:])
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    return args.batch * args.seq / statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data_dir = prepared_dataset(args.data)
    load_before = os.getloadavg()[0]
    loader = loader_tokens_per_s(data_dir, args)
    step = step_tokens_per_s(args)
    print(f"batch {args.batch} x seq {args.seq}, {args.workers} reader worker(s), preset {args.preset}")
    print(f"loader {loader:,.0f} tokens/s; training step {step:,.0f} tokens/s; loader / step = {loader / step:,.0f}x")
    row = {
        "bench": "loader",
        "data": data_dir,
        "preset": args.preset,
        "batch": args.batch,
        "seq": args.seq,
        "workers": args.workers,
        "loader_tokens_per_s": loader,
        "step_tokens_per_s": step,
        "ratio_loader_over_step": loader / step,
        **common.environment("cpu", load_before),
    }
    print(f"appended to {common.append_jsonl(args.out, [row])}")


if __name__ == "__main__":
    main()
