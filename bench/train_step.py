"""Training throughput: our `Transformer` against Hugging Face `MistralForCausalLM`, same weights, same batch.

What is measured: one training step = forward + mean next-token cross-entropy over the logits + backward
(gradients are cleared before each step, outside the timed region; no optimizer step). Both models are built
from one `ModelConfig`; the Hugging Face model is created with `attn_implementation="sdpa"` (its fastest CPU
path) and loaded with our weights through `moxin_lightning.hf.to_hf_state_dict`, so both compute the same
function (the first step's losses are printed side by side as a check). After `--warmup` untimed rounds, each
of `--steps` rounds times one step of each model, alternating which goes first, and the median is reported as
tokens/s = batch * seq / seconds. With `--compile` both models are wrapped by `torch.compile(model)` with the
same default settings (the loss stays outside the compiled region, for both).

`--loss logits` (default) gives both models the same loss code on full logits: a backbone-to-backbone
comparison. `--loss fused` runs our training path instead: `Transformer.hidden_states` and
`moxin_lightning.losses.linear_cross_entropy`, which fuses the output head with the loss and never keeps
the (tokens x vocab) logits; HF keeps its logits + cross-entropy.

One case is run per `--window` value (default 256 and 512 at seq 512: the sliding window cuts the sequence,
then it does not), and each case appends one JSON line to `--out`.

Run (about 1-3 minutes on 2 CPU cores with the defaults):

    HF_HUB_OFFLINE=1 python bench/train_step.py
    HF_HUB_OFFLINE=1 python bench/train_step.py --compile
    HF_HUB_OFFLINE=1 python bench/train_step.py --loss fused [--compile]
    HF_HUB_OFFLINE=1 python bench/train_step.py --preset moxin-small-124m --batch 8 --seq 1024 --window 512 \\
        --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import common
import torch
import torch.nn.functional as F

from moxin_lightning.losses import linear_cross_entropy
from moxin_lightning.model.config import PRESETS, ModelConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--preset", default="moxin-tiny-23m", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument(
        "--window",
        type=common.parse_window,
        nargs="+",
        default=[256, 512],
        help="sliding window(s); one case each ('none' = full attention). Default: 256 (cuts seq 512) and 512",
    )
    parser.add_argument("--steps", type=int, default=7, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (compilation happens here)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (default mode)")
    parser.add_argument(
        "--loss",
        default="logits",
        choices=["logits", "fused"],
        help="ours: CE on full logits like HF, or the fused head + CE of moxin_lightning.losses",
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(common.DTYPES))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--attention", default="sdpa", help="our attention kernel (ModelConfig.attention)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/train_step.jsonl", help="JSON lines file to append to")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    return args


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from position t (fp32 logits)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def fused_next_token_loss(hidden: torch.Tensor, head: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    loss_sum, count = linear_cross_entropy(hidden[:, :-1], head, ids[:, 1:])
    return loss_sum / count


def run_case(args: argparse.Namespace, window: int | None) -> dict:
    dtype = common.DTYPES[args.dtype]
    max_seq_len = max(args.seq, PRESETS[args.preset]["max_seq_len"])
    config = ModelConfig.from_name(
        args.preset, sliding_window=window, attention=args.attention, max_seq_len=max_seq_len
    )
    ours, hf = common.build_models(config, dtype, args.device, args.seed)
    hf.config.use_cache = False
    ours.train()
    hf.train()
    ours_body = ours.hidden_states if args.loss == "fused" else ours
    if args.compile:
        torch._dynamo.reset()
        ours_fn, hf_fn = torch.compile(ours_body), torch.compile(hf)
    else:
        ours_fn, hf_fn = ours_body, hf

    generator = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator).to(args.device)

    steps = {
        "ours": (
            ours,
            (lambda: fused_next_token_loss(ours_fn(ids), ours.lm_head.weight, ids))
            if args.loss == "fused"
            else (lambda: next_token_loss(ours_fn(ids), ids)),
        ),
        "hf": (hf, lambda: next_token_loss(hf_fn(input_ids=ids, use_cache=False).logits, ids)),
    }
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    first_loss: dict[str, float] = {}
    compile_s: dict[str, float] = {}
    load_before = os.getloadavg()[0]
    for round_ in range(args.warmup + args.steps):
        order = ("ours", "hf") if round_ % 2 == 0 else ("hf", "ours")
        for name in order:
            model, step = steps[name]
            model.zero_grad(set_to_none=True)
            common.sync(args.device)
            start = time.perf_counter()
            loss = step()
            loss.backward()
            common.sync(args.device)
            elapsed = time.perf_counter() - start
            if round_ == 0:
                first_loss[name] = loss.item()
                compile_s[name] = elapsed
            if round_ >= args.warmup:
                times[name].append(elapsed)

    tokens = args.batch * args.seq
    median = {name: statistics.median(t) for name, t in times.items()}
    tok_s = {name: tokens / median[name] for name in median}
    best = {name: min(t) for name, t in times.items()}
    return {
        **common.record_start("train_step", args.preset, config, ours.num_params()),
        "batch": args.batch,
        "seq": args.seq,
        "window": window,
        "window_cuts_seq": window is not None and args.seq > window,
        "mode": "compile" if args.compile else "eager",
        "ours_loss": args.loss,
        "dtype": args.dtype,
        "device": args.device,
        "ours_attention": args.attention,
        "hf_attn_implementation": common.HF_ATTENTION,
        "warmup": args.warmup,
        "steps": args.steps,
        "ours_tokens_per_s": tok_s["ours"],
        "hf_tokens_per_s": tok_s["hf"],
        "ratio_ours_over_hf": tok_s["ours"] / tok_s["hf"],
        "ours_step_s_median": median["ours"],
        "hf_step_s_median": median["hf"],
        "ratio_best_ours_over_hf": best["hf"] / best["ours"],
        "ours_step_s_all": times["ours"],
        "hf_step_s_all": times["hf"],
        "first_step_s": compile_s,
        "first_loss": first_loss,
        **common.environment(args.device, load_before),
    }


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'case':<22} {'mode':<8} {'loss':<7} {'ours tok/s':>11} {'HF tok/s':>11} {'ours/HF':>8} "
        f"{'ours ms':>9} {'HF ms':>9} {'best ours/HF':>13}  first loss ours / HF"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        case = f"seq {r['seq']} win {r['window']}"
        print(
            f"{case:<22} {r['mode']:<8} {r['ours_loss']:<7} "
            f"{r['ours_tokens_per_s']:>11.0f} {r['hf_tokens_per_s']:>11.0f} "
            f"{r['ratio_ours_over_hf']:>8.3f} {1000 * r['ours_step_s_median']:>9.1f} "
            f"{1000 * r['hf_step_s_median']:>9.1f} {r['ratio_best_ours_over_hf']:>13.3f}  "
            f"{r['first_loss']['ours']:.6f} / {r['first_loss']['hf']:.6f}"
        )


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"train step (forward + CE loss + backward): preset {args.preset}, batch {args.batch}, seq {args.seq}, "
        f"{args.dtype} on {args.device}, {'torch.compile' if args.compile else 'eager'}, "
        f"{torch.get_num_threads()} threads; ours attention={args.attention!r}, ours loss={args.loss!r}, "
        f"HF attn_implementation={common.HF_ATTENTION!r}; "
        f"torch {torch.__version__}, transformers {common.transformers_version()}; "
        f"{args.warmup} warmup + median of {args.steps} interleaved steps"
    )
    rows = []
    for window in args.window:
        row = run_case(args, window)
        rows.append(row)
        print(
            f"  done: seq {args.seq} win {window}: ours {row['ours_tokens_per_s']:.0f} tok/s, "
            f"HF {row['hf_tokens_per_s']:.0f} tok/s (first step {row['first_step_s']['ours']:.1f} s / "
            f"{row['first_step_s']['hf']:.1f} s)",
            flush=True,
        )
    print()
    print_table(rows)
    print("tok/s and ms: median step; best ours/HF: ratio of the fastest step of each (less sensitive to other load)")
    out = common.append_jsonl(args.out, rows)
    print(f"\nappended {len(rows)} line(s) to {out}")


if __name__ == "__main__":
    main()
