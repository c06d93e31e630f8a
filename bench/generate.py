"""Greedy generation throughput: `moxin_lightning.generate.generate` against Hugging Face `model.generate`.

What is measured: wall time of one greedy generation call per model (prefill of the prompt + `--new` decode
steps), for each `--batch` size, on the same random weights (our `Transformer` with seeded weights; HF
`MistralForCausalLM`, `attn_implementation="sdpa"` and its default cache, loaded with the same tensors through
`moxin_lightning.hf.to_hf_state_dict`). Every row is a random prompt of exactly `--prompt` tokens (no padding).
Both sides produce exactly `--new` tokens per row: ours runs with `eos_id=None`, HF with
`generation_config.eos_token_id = None` (no early stop, no logits processor). Reported per batch size:

  * end-to-end new tokens/s = batch * new / seconds (median of `--repeats` interleaved calls, after `--warmup`),
  * prefill time, measured as a generation of 1 new token, and decode tokens/s from the remaining time,
  * agreement: the fraction of generated tokens that are identical between the two (1.0 expected in fp32;
    greedy decoding of random weights can flip on a near tie, after which the rows diverge).

The default model is `moxin-tiny-23m` with its sliding window set to 256, smaller than prompt + new tokens
(512 + 256), so our rolling buffer wraps around and HF's sliding-window cache crops. Each batch size appends
one JSON line to `--out`.

Run (a few minutes on 2 CPU cores with the defaults; `--compile` runs our decode step under torch.compile,
compiled during the warmup call, HF staying in its default eager mode):

    HF_HUB_OFFLINE=1 python bench/generate.py
    HF_HUB_OFFLINE=1 python bench/generate.py --compile
    HF_HUB_OFFLINE=1 python bench/generate.py --batch 1 4 16 --prompt 128 --new 64 --window none
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import TYPE_CHECKING

import common
import torch

from moxin_lightning.generate import generate
from moxin_lightning.model.config import PRESETS, ModelConfig
from moxin_lightning.model.transformer import Transformer

if TYPE_CHECKING:
    from transformers import MistralForCausalLM


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--preset", default="moxin-tiny-23m", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes, one case each")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens per row")
    parser.add_argument("--new", type=int, default=256, help="new tokens per row")
    parser.add_argument("--window", type=common.parse_window, default=256, help="model sliding_window ('none' = full)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per model (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per model first")
    parser.add_argument("--dtype", default="float32", choices=sorted(common.DTYPES))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--attention", default="sdpa", help="our attention kernel (ModelConfig.attention)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compile", action="store_true", help="ours: generate(..., compile=True), decode step under torch.compile"
    )
    parser.add_argument("--out", default="bench/results/generate.jsonl", help="JSON lines file to append to")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.new < 2:
        parser.error("--new must be >= 2 (prefill is timed separately as a 1-token generation)")
    return args


def greedy_generation_config(hf: MistralForCausalLM) -> None:
    """Set HF's generation_config so `generate` does what ours does with `eos_id=None`.

    Greedy, no early stop on EOS, nothing that alters the logits: exactly `max_new_tokens` argmax tokens per
    row, so both sides do the same work and their tokens can be compared.
    """
    gen = hf.generation_config
    gen.eos_token_id = None
    gen.pad_token_id = 0
    gen.do_sample = False
    gen.temperature = gen.top_p = gen.top_k = None


def run_ours(model: Transformer, prompts: torch.Tensor, new: int, compile: bool) -> torch.Tensor:
    tokens = generate(model, prompts.tolist(), new, eos_id=None, compile=compile)
    return torch.tensor(tokens)


@torch.inference_mode()
def run_hf(model, prompts: torch.Tensor, new: int) -> torch.Tensor:
    out = model.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
    )
    return out[:, prompts.shape[1] :].cpu()


def timed(fn, device: str) -> tuple[float, torch.Tensor]:
    common.sync(device)
    start = time.perf_counter()
    result = fn()
    common.sync(device)
    return time.perf_counter() - start, result


def run_case(args: argparse.Namespace, ours, hf, config: ModelConfig, batch: int) -> dict:
    generator = torch.Generator().manual_seed(args.seed + batch)
    # Ids 3.. leave out <unk>, <s>, </s>.
    prompts = torch.randint(3, config.vocab_size, (batch, args.prompt), generator=generator).to(args.device)
    runners = {"ours": lambda n: run_ours(ours, prompts, n, args.compile), "hf": lambda n: run_hf(hf, prompts, n)}

    full: dict[str, list[float]] = {"ours": [], "hf": []}
    prefill: dict[str, list[float]] = {"ours": [], "hf": []}
    tokens: dict[str, torch.Tensor] = {}
    load_before = os.getloadavg()[0]
    for round_ in range(args.warmup + args.repeats):
        order = ("ours", "hf") if round_ % 2 == 0 else ("hf", "ours")
        for name in order:
            seconds, out = timed(lambda name=name: runners[name](args.new), args.device)
            if out.shape != (batch, args.new):
                raise RuntimeError(f"{name} generated {tuple(out.shape)} tokens, expected {(batch, args.new)}")
            tokens[name] = out
            if round_ >= args.warmup:
                full[name].append(seconds)
        for name in order:
            seconds, _ = timed(lambda name=name: runners[name](1), args.device)
            if round_ >= args.warmup:
                prefill[name].append(seconds)

    result: dict = {}
    for name in ("ours", "hf"):
        total, first = statistics.median(full[name]), statistics.median(prefill[name])
        result[name] = {
            "tokens_per_s": batch * args.new / total,
            "total_s_median": total,
            "total_s_all": full[name],
            "prefill_s_median": first,
            "decode_tokens_per_s": batch * (args.new - 1) / max(total - first, 1e-9),
        }
    same = tokens["ours"] == tokens["hf"]
    mismatch = (~same).int().argmax(dim=1)
    first_diff = [int(m) if not row.all() else None for m, row in zip(mismatch, same, strict=True)]
    return {
        **common.record_start("generate", args.preset, config, ours.num_params()),
        "batch": batch,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        "window": config.sliding_window,
        "window_wraps": config.sliding_window is not None and args.prompt + args.new > config.sliding_window,
        "decoding": "greedy",
        "dtype": args.dtype,
        "device": args.device,
        "ours_attention": args.attention,
        "ours_decode": "torch.compile" if args.compile else "eager",
        "hf_attn_implementation": common.HF_ATTENTION,
        "hf_cache": "default (DynamicCache, sliding-window layers)",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "ours_tokens_per_s": result["ours"]["tokens_per_s"],
        "hf_tokens_per_s": result["hf"]["tokens_per_s"],
        "ratio_ours_over_hf": result["ours"]["tokens_per_s"] / result["hf"]["tokens_per_s"],
        "ours": result["ours"],
        "hf": result["hf"],
        "ratio_best_ours_over_hf": min(full["hf"]) / min(full["ours"]),
        "decode_ratio_ours_over_hf": result["ours"]["decode_tokens_per_s"] / result["hf"]["decode_tokens_per_s"],
        "prefill_ratio_ours_over_hf": result["hf"]["prefill_s_median"] / result["ours"]["prefill_s_median"],
        "token_agreement": same.float().mean().item(),
        "first_mismatch_per_row": first_diff,
        **common.environment(args.device, load_before),
    }


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'batch':>5} {'ours tok/s':>11} {'HF tok/s':>10} {'ours/HF':>8} {'ours prefill':>13} {'HF prefill':>11} "
        f"{'ours decode':>12} {'HF decode':>10} {'decode ours/HF':>15} {'best ours/HF':>13} {'agree':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        o, h = r["ours"], r["hf"]
        print(
            f"{r['batch']:>5} {o['tokens_per_s']:>11.1f} {h['tokens_per_s']:>10.1f} {r['ratio_ours_over_hf']:>8.3f} "
            f"{1000 * o['prefill_s_median']:>10.0f} ms {1000 * h['prefill_s_median']:>8.0f} ms "
            f"{o['decode_tokens_per_s']:>12.1f} {h['decode_tokens_per_s']:>10.1f} "
            f"{r['decode_ratio_ours_over_hf']:>15.3f} {r['ratio_best_ours_over_hf']:>13.3f} "
            f"{r['token_agreement']:>6.3f}"
        )
    print(
        "tok/s: new tokens per second end to end (prefill + decode), median call; decode tok/s excludes the prefill "
        "time; best ours/HF: ratio of the fastest end-to-end call of each (less sensitive to other load)"
    )


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = common.DTYPES[args.dtype]
    max_seq_len = max(args.prompt + args.new, PRESETS[args.preset]["max_seq_len"])
    config = ModelConfig.from_name(
        args.preset, sliding_window=args.window, attention=args.attention, max_seq_len=max_seq_len
    )
    ours, hf = common.build_models(config, dtype, args.device, args.seed)
    ours.eval()
    hf.eval()
    greedy_generation_config(hf)
    print(
        f"greedy generation: preset {args.preset} ({ours.num_params() / 1e6:.1f}M params), sliding_window "
        f"{config.sliding_window}, prompt {args.prompt} + {args.new} new tokens, {args.dtype} on {args.device}, "
        f"{torch.get_num_threads()} threads; ours attention={args.attention!r} "
        f"({'compiled' if args.compile else 'eager'} decode), HF attn_implementation="
        f"{common.HF_ATTENTION!r} with its default cache; "
        f"torch {torch.__version__}, transformers {common.transformers_version()}; "
        f"{args.warmup} warmup + median of {args.repeats} interleaved calls"
    )
    rows = []
    for batch in args.batch:
        row = run_case(args, ours, hf, config, batch)
        rows.append(row)
        print(
            f"  done: batch {batch}: ours {row['ours_tokens_per_s']:.1f} tok/s, HF {row['hf_tokens_per_s']:.1f} tok/s, "
            f"agreement {row['token_agreement']:.3f}",
            flush=True,
        )
    print()
    print_table(rows)
    out = common.append_jsonl(args.out, rows)
    print(f"\nappended {len(rows)} line(s) to {out}")


if __name__ == "__main__":
    main()
