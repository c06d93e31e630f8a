"""Pretraining speed: tokens/s and MFU of the local config, against the matmul peak measured in the same run.

MFU = model FLOPs per second / peak FLOPs, with the model FLOPs per token from `ModelConfig.flops_per_token`
(what `moxin_lightning.callbacks.throughput.TrainingSpeed` logs during training). Cases:

  * local (always): the CPU training the local config runs: `Trainer.fit` of the `Pretrain` task on packed
    batches {input_ids, labels, doc_ids} (random tokens, documents of random length: batches are held in memory,
    so data loading is not measured; `bench/loader.py` does that), with `TrainingSpeed` attached. The peak is the
    best rate of a square matmul in the training dtype on this machine, measured just before and just after the
    steps; the higher of the two is used, so a machine slowed by other load gives a lower MFU, never a higher one.
  * gpu (`--gpu`, CUDA only): a moxin-7b-shaped stack (`--gpu_layers` blocks of dim 4096, 32/8 heads, FFN 14336,
    with the 32K embedding and head) trained in bf16 at 4K context, one document per row, flash-attn's kernel
    if installed, else PyTorch SDPA (its flash backend): forward + fused head/cross-entropy + backward + fused
    AdamW. MFU against the datasheet's dense bf16 peak (goal >= 45%), and against the matmul peak measured there.

Tokens/s is the median over `--steps` optimizer steps after `--warmup` untimed ones; the figure TrainingSpeed
logged over the same steps (a mean) is recorded beside it. Each case appends one JSON line to `--out`.

Run (about a minute on 2 CPU cores):

    python bench/pretrain.py                  # what conf/local.yaml trains
    python bench/pretrain.py --batch 8 --precision bf16-true
    python bench/pretrain.py --gpu            # on a CUDA machine: also the moxin-7b layer stack
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from typing import Any

import common
import lightning as L
import torch

from moxin_lightning.callbacks.throughput import TrainingSpeed
from moxin_lightning.flops import measure_matmul_flops, peak_flops, precision_dtype
from moxin_lightning.losses import IGNORE_INDEX, linear_cross_entropy
from moxin_lightning.model import ModelConfig, Transformer
from moxin_lightning.model.config import PRESETS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", default="conf/local.yaml", help="model, batch and seq of the local case")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="instead of the config's")
    parser.add_argument("--batch", type=int, default=None, help="instead of the config's")
    parser.add_argument("--seq", type=int, default=None, help="instead of the config's")
    parser.add_argument("--precision", default="32-true", help="Lightning precision of the local case")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--gpu", action="store_true", help="also the moxin-7b layer stack on CUDA")
    parser.add_argument("--gpu_layers", type=int, default=8, help="moxin-7b blocks in the GPU stack")
    parser.add_argument("--gpu_batch", type=int, default=1)
    parser.add_argument("--gpu_seq", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/pretrain.jsonl", help="JSON lines file to append to")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps {args.steps} must be >= 1 and --warmup {args.warmup} >= 0")
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu but CUDA is not available on this machine")
    try:
        precision_dtype(args.precision)
    except ValueError as error:
        parser.error(str(error))
    return args


def packed_batch(config: ModelConfig, batch: int, seq: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tokens packed like `PretrainData`'s: documents of 32..seq tokens, each first label masked."""
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    starts = torch.rand(batch, seq, generator=generator) < 1 / 256  # ~2 documents per 512-token row
    starts[:, 0] = True
    doc_ids = starts.cumsum(dim=1) - 1
    labels = ids.masked_fill(starts, IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels, "doc_ids": doc_ids}


class StepClock(L.Callback):
    """Wall time at the start of training and at the end of each optimizer step (GPU work included)."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self._step = -1

    def _mark(self, trainer: L.Trainer) -> None:
        common.sync(trainer.strategy.root_device.type)
        self.marks.append(time.perf_counter())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = trainer.global_step
        self._mark(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step != self._step:
            self._step = trainer.global_step
            self._mark(trainer)


def apply_config(args: argparse.Namespace) -> None:
    """The local case trains what `--config` (conf/local.yaml) trains: its preset, model overrides, rows and length."""
    import yaml

    config = yaml.safe_load(open(args.config))
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    args.preset = args.preset or model["preset"]
    args.model_overrides = {} if args.preset != model["preset"] else dict(model.get("model_overrides") or {})
    args.model_overrides.pop("attention", None)  # the case runs SDPA, the CPU kernel
    args.batch = args.batch or data["batch_size"]
    args.seq = args.seq or data["seq_len"]


def run_local(args: argparse.Namespace, peak: float) -> dict:
    """`Trainer.fit` of the Pretrain task; step times from StepClock, plus what TrainingSpeed logged."""
    from moxin_lightning.tasks import Pretrain

    overrides = {**args.model_overrides, "max_seq_len": max(args.seq, PRESETS[args.preset]["max_seq_len"])}
    task = Pretrain(preset=args.preset, model_overrides=overrides, seed=args.seed, warmup_steps=0, compile=args.compile)
    generator = torch.Generator().manual_seed(args.seed)
    total = args.warmup + args.steps
    batches = [packed_batch(task.model_config, args.batch, args.seq, generator) for _ in range(total)]
    clock, speed = StepClock(), TrainingSpeed(window=args.steps, peak_flops=peak)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=args.precision, max_steps=total, callbacks=[clock, speed],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(task, torch.utils.data.DataLoader(batches, batch_size=None))
    step_s = [later - earlier for earlier, later in itertools.pairwise(clock.marks)]
    return {
        "config": task.model_config,
        "params": task.model.num_params(),
        "step_s": step_s,
        "callback_tokens_per_s": float(trainer.callback_metrics["train/tokens_per_s"]),
        "callback_mfu": float(trainer.callback_metrics["train/mfu"]),
    }


def run_loop(config: ModelConfig, batch: int, seq: int, steps: int, device: str, dtype: torch.dtype, args) -> dict:
    """A plain training loop on `device`: forward + fused head/CE + backward + AdamW, one document per row."""
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Transformer(config).to(dtype)
    if args.compile:
        for block in model.blocks:
            block.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator).to(device)
    step_s = []
    for _ in range(steps):
        common.sync(device)
        start = time.perf_counter()
        loss_sum, count = linear_cross_entropy(model.hidden_states(ids)[:, :-1], model.lm_head.weight, ids[:, 1:])
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        common.sync(device)
        step_s.append(time.perf_counter() - start)
    return {"config": config, "params": model.num_params(), "step_s": step_s}


def summarise(case: str, run: dict, batch: int, seq: int, warmup: int, peak: float) -> dict:
    config: ModelConfig = run["config"]
    timed = run["step_s"][warmup:]
    tokens_per_s = batch * seq / statistics.median(timed)
    flops_per_token = config.flops_per_token(seq)
    return {
        "case": case,
        "batch": batch,
        "seq": seq,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "model_flops_per_s": tokens_per_s * flops_per_token,
        "mfu": tokens_per_s * flops_per_token / peak,
        "step_s_median": statistics.median(timed),
        "step_s_all": run["step_s"],
        "warmup": warmup,
        "steps": len(timed),
    }


def local_case(args: argparse.Namespace) -> dict:
    dtype = precision_dtype(args.precision)
    load_before = os.getloadavg()[0]
    before = measure_matmul_flops("cpu", dtype)
    run = run_local(args, peak=before)  # TrainingSpeed's MFU is re-based on the final peak below
    after = measure_matmul_flops("cpu", dtype)
    peak = max(before, after)
    row = summarise("local", run, args.batch, args.seq, args.warmup, peak)
    return {
        **common.record_start("pretrain", args.preset, run["config"], run["params"]),
        **row,
        "engine": "Trainer.fit(Pretrain)",
        "precision": args.precision,
        "device": "cpu",
        "compile": args.compile,
        "attention": run["config"].attention,
        "peak_flops": peak,
        "peak_source": f"measured {dtype} matmul 1024x1024 on cpu, best of before/after",
        "peak_measured_before_after": [before, after],
        "callback_tokens_per_s": run["callback_tokens_per_s"],
        "callback_mfu": run["callback_mfu"] * before / peak,
        **common.environment("cpu", load_before),
    }


def gpu_case(args: argparse.Namespace) -> dict:
    import importlib.util

    attention = "flash" if importlib.util.find_spec("flash_attn") else "sdpa"
    config = ModelConfig.from_name("moxin-7b", n_layers=args.gpu_layers, attention=attention)
    load_before = os.getloadavg()[0]
    datasheet = peak_flops("cuda", torch.bfloat16)
    measured = measure_matmul_flops("cuda", torch.bfloat16)
    run = run_loop(config, args.gpu_batch, args.gpu_seq, args.warmup + args.steps, "cuda", torch.bfloat16, args)
    row = summarise("gpu-7b-stack", run, args.gpu_batch, args.gpu_seq, args.warmup, datasheet.flops)
    return {
        **common.record_start("pretrain", "moxin-7b", config, run["params"]),
        **row,
        "engine": "loop: bf16 params, fused head+CE, fused AdamW",
        "precision": "bf16-true",
        "device": "cuda",
        "compile": args.compile,
        "attention": attention,
        "peak_flops": datasheet.flops,
        "peak_source": datasheet.source,
        "peak_measured": measured,
        "mfu_vs_measured_peak": row["model_flops_per_s"] / measured,
        "goal_mfu": 0.45,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        **common.environment("cuda", load_before),
    }


def print_row(row: dict) -> None:
    extra = f", {row['mfu_vs_measured_peak']:.1%} of the measured matmul peak" if "peak_measured" in row else ""
    print(
        f"  {row['case']:<13} {row['tokens_per_s']:>10,.0f} tok/s  {row['model_flops_per_s'] / 1e12:8.3f} TFLOP/s  "
        f"MFU {row['mfu']:.1%} of {row['peak_flops'] / 1e12:.3f} TFLOP/s ({row['peak_source']}){extra}"
    )


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    apply_config(args)
    torch.set_num_threads(args.threads)
    print(
        f"pretrain speed: local {args.preset}, batch {args.batch} x seq {args.seq}, precision {args.precision}, "
        f"{'compiled' if args.compile else 'eager'}, {torch.get_num_threads()} threads; "
        f"{args.warmup} warmup + median of {args.steps} optimizer steps"
    )
    rows = [local_case(args)]
    print_row(rows[-1])
    print(
        f"  (TrainingSpeed logged {rows[-1]['callback_tokens_per_s']:,.0f} tok/s, MFU {rows[-1]['callback_mfu']:.1%})"
    )
    if args.gpu:
        rows.append(gpu_case(args))
        print_row(rows[-1])
    out = common.append_jsonl(args.out, rows)
    print(f"appended {len(rows)} line(s) to {out}")


if __name__ == "__main__":
    main()
