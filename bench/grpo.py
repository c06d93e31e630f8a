"""GRPO rollouts: our sampler against Hugging Face `model.generate`, and the share of a GRPO step spent generating.

Two cases, each appending one JSON line to `--out`:

  * rollout: wall time of one sampling call per model for P=`--prompts` prompts x G=`--group` completions
    (P*G rows), each prompt `--prompt` random tokens (no padding), `--new` new tokens per row, temperature
    `--temperature`, top_p 1.0, no top-k and no EOS stop, so both sides produce exactly P*G*new tokens. Ours is
    `moxin_lightning.generate.sample` (what `tasks.GRPO` calls, with the per-token log-probs it returns); HF is
    `MistralForCausalLM.generate(do_sample=True, temperature, top_k=0, top_p=1.0, min_new_tokens=new)`,
    `attn_implementation="sdpa"` and its default cache, loaded with the same tensors through
    `moxin_lightning.hf.to_hf_state_dict` (`common.build_models`, as in `bench/generate.py`). Reported: new
    tokens/s = P*G*new / seconds (median of `--repeats` interleaved calls after `--warmup`) and ours / HF.
    Samples differ between the two (different random streams), so no token agreement is reported.
  * grpo_step: `--steps` optimizer steps (after `--grpo_warmup` untimed ones) of `moxin_lightning.tasks.GRPO`
    under `Trainer.fit`, with the same model, P, G and lengths, on a tiny in-memory datamodule (random prompts,
    a tokenizer with no EOS so every completion runs to `--new` tokens, a cheap reward with spread within each
    group). Reported: the logged `train/generation_share` (seconds in `sample` / seconds of the whole training
    step: rollout, old log-probs, forward/backward, optimizer) and `train/generation_tokens_per_s`, as means
    over the timed steps, and the step time. The peer here is the rollout case's HF figure: the HF-rollout
    share is what the step's share would be if the sampling ran at HF's speed instead.

The default model is `moxin-tiny-23m` (as `bench/generate.py`), with its own sliding window (512, not reached
by 64 + 128 tokens).

Run (about 2-3 minutes on 2 CPU cores with the defaults; `--compile` runs our decode step under torch.compile in
the rollout case, compiled during the warmup call, HF staying eager; the GRPO task samples eagerly either way):

    HF_HUB_OFFLINE=1 python bench/grpo.py
    HF_HUB_OFFLINE=1 python bench/grpo.py --compile --skip_grpo
    HF_HUB_OFFLINE=1 python bench/grpo.py --preset moxin-tiny-9m --vocab 4096
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import common
import lightning as L
import rollout_lengths
import torch
from lightning.pytorch.callbacks import Callback

from moxin_lightning.datamodules.pretrain import FixedBatches
from moxin_lightning.generate import sample
from moxin_lightning.model.config import PRESETS, ModelConfig
from moxin_lightning.model.transformer import Transformer
from moxin_lightning.rewards import Reward
from moxin_lightning.tasks.grpo import GRPO


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--preset", default="moxin-tiny-23m", choices=sorted(PRESETS))
    parser.add_argument("--vocab", type=int, default=None, help="vocab_size instead of the preset's")
    parser.add_argument("--window", type=common.parse_window, default=None, help="sliding_window instead of preset's")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (P)")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    parser.add_argument("--new", type=int, default=128, help="new tokens per row")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=2, help="timed rollout calls per model (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rollout calls per model first")
    parser.add_argument("--steps", type=int, default=3, help="timed GRPO steps (means reported)")
    parser.add_argument("--grpo_warmup", type=int, default=1, help="untimed GRPO steps first")
    parser.add_argument("--skip_grpo", action="store_true", help="leave out the GRPO step case")
    parser.add_argument("--skip_varied", action="store_true", help="leave out the varied-length and roofline cases")
    parser.add_argument(
        "--slots", type=int, default=None, help="varied case: KV budget for this many rows (default: a quarter)"
    )
    parser.add_argument("--attention", default="sdpa", help="our attention kernel (ModelConfig.attention)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="ours: sample(..., compile=True) in the rollout case")
    parser.add_argument("--out", default="bench/results/grpo.jsonl", help="JSON lines file to append to")
    args = parser.parse_args(argv)
    if args.group < 2 or args.new < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--group must be >= 2, --new, --steps and --repeats >= 1")
    return args


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {
        "attention": args.attention,
        "max_seq_len": max(args.prompt + args.new, PRESETS[args.preset]["max_seq_len"]),
    }
    if args.vocab is not None:
        overrides["vocab_size"] = args.vocab
    if args.window is not None:
        overrides["sliding_window"] = args.window
    return overrides


def random_prompts(args: argparse.Namespace, config: ModelConfig) -> torch.Tensor:
    """P distinct random prompts (ids 3.. leave out <unk>, <s>, </s>), each repeated G times: (P*G, prompt)."""
    generator = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(3, config.vocab_size, (args.prompts, args.prompt), generator=generator)
    return prompts.repeat_interleave(args.group, dim=0)


# -- rollout case ---------------------------------------------------------------------------------------------


def sampling_generation_config(hf, temperature: float) -> None:
    """HF samples as ours does: temperature only (no top-k, top_p 1.0), no EOS stop, nothing else on the logits."""
    gen = hf.generation_config
    gen.eos_token_id = None
    gen.pad_token_id = 0
    gen.do_sample = True
    gen.temperature, gen.top_p, gen.top_k = temperature, 1.0, 0


def run_ours(model: Transformer, prompts: torch.Tensor, args: argparse.Namespace, seed: int) -> torch.Tensor:
    generation = sample(
        model, prompts.tolist(), args.new, temperature=args.temperature, seed=seed, compile=args.compile
    )
    return torch.tensor(generation.tokens)


@torch.inference_mode()
def run_hf(model, prompts: torch.Tensor, args: argparse.Namespace, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=args.new,
        min_new_tokens=args.new,
        do_sample=True,
        temperature=args.temperature,
        top_k=0,
        top_p=1.0,
    )
    return out[:, prompts.shape[1] :]


def rollout_case(args: argparse.Namespace, config: ModelConfig) -> dict:
    ours, hf = common.build_models(config, torch.float32, "cpu", args.seed)
    ours.eval()
    hf.eval()
    sampling_generation_config(hf, args.temperature)
    prompts = random_prompts(args, config)
    rows = prompts.shape[0]
    runners = {"ours": run_ours, "hf": lambda model, p, a, s: run_hf(model, p, a, s)}
    models = {"ours": ours, "hf": hf}
    seconds: dict[str, list[float]] = {"ours": [], "hf": []}
    load_before = os.getloadavg()[0]
    for round_ in range(args.warmup + args.repeats):
        for name in ("ours", "hf") if round_ % 2 == 0 else ("hf", "ours"):
            start = time.perf_counter()
            out = runners[name](models[name], prompts, args, args.seed + round_)
            elapsed = time.perf_counter() - start
            if tuple(out.shape) != (rows, args.new):
                raise RuntimeError(f"{name} generated {tuple(out.shape)} tokens, expected {(rows, args.new)}")
            if round_ >= args.warmup:
                seconds[name].append(elapsed)
    result = {}
    for name in ("ours", "hf"):
        median = statistics.median(seconds[name])
        result[name] = {
            "tokens_per_s": rows * args.new / median,
            "total_s_median": median,
            "total_s_all": seconds[name],
        }
    return {
        **common.record_start("grpo", args.preset, config, ours.num_params()),
        "case": "rollout",
        "prompts": args.prompts,
        "group_size": args.group,
        "rows": rows,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        "decoding": f"sample temperature={args.temperature} top_p=1.0 top_k=0, no EOS stop",
        "window": config.sliding_window,
        "dtype": "float32",
        "device": "cpu",
        "ours_attention": args.attention,
        "ours_decode": "torch.compile" if args.compile else "eager",
        "hf_attn_implementation": common.HF_ATTENTION,
        "hf_cache": "default (DynamicCache)",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "ours_tokens_per_s": result["ours"]["tokens_per_s"],
        "hf_tokens_per_s": result["hf"]["tokens_per_s"],
        "ratio_ours_over_hf": result["ours"]["tokens_per_s"] / result["hf"]["tokens_per_s"],
        "ratio_best_ours_over_hf": min(seconds["hf"]) / min(seconds["ours"]),
        "ours": result["ours"],
        "hf": result["hf"],
        **common.environment("cpu", load_before),
    }


# -- GRPO step case -------------------------------------------------------------------------------------------


class NoEosTokenizer:
    """Ids as text, and no EOS id: every completion runs to max_response_length, as in the rollout case."""

    bos_id, eos_id, pad_id, fingerprint = 1, None, 0, "bench-ids"

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


class EvenShare(Reward):
    """The fraction of even token ids in the completion: cheap, and spread within each group (non-zero advantages)."""

    name = "even_share"

    def __call__(self, completions: list[str], answers: list[str], prompts: list[str]) -> list[float]:
        scores = []
        for text in completions:
            ids = [int(t) for t in text.split()]
            scores.append(sum(i % 2 == 0 for i in ids) / max(len(ids), 1))
        return scores


class RandomPrompts(L.LightningDataModule):
    def __init__(self, prompts: torch.Tensor, vocab_size: int, batches: int) -> None:
        super().__init__()
        self.tokenizer = NoEosTokenizer(vocab_size)
        self.batch = {
            "prompt_ids": prompts.tolist(),
            "prompt_text": [self.tokenizer.decode(p) for p in prompts.tolist()],
            "answer": [""] * len(prompts),
            "prompt_index": torch.arange(len(prompts)),
        }
        self.batches = batches

    def train_dataloader(self) -> FixedBatches:
        return FixedBatches([self.batch] * self.batches)


class StepMetrics(Callback):
    """The task's logged train/* values and the wall time of each training step."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = time.perf_counter() - self.started
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        self.rows.append({**metrics, "step_s": seconds})


def grpo_case(args: argparse.Namespace, config: ModelConfig, peer: dict | None) -> dict:
    task = GRPO(
        rewards=[EvenShare()],
        preset=args.preset,
        model_overrides=model_overrides(args),
        group_size=args.group,
        temperature=args.temperature,
        top_p=1.0,
        max_response_length=args.new,
        lr=1e-5,
        warmup_steps=0,
        schedule="constant",
        seed=args.seed,
    )
    # Distinct prompts, each once: the task repeats each G times itself.
    prompts = random_prompts(args, config)[:: args.group]
    metrics = StepMetrics()
    trainer = L.Trainer(
        accelerator="cpu",
        precision="32-true",
        max_steps=args.grpo_warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[metrics],
    )
    load_before = os.getloadavg()[0]
    trainer.fit(task, RandomPrompts(prompts, config.vocab_size, args.grpo_warmup + args.steps))
    timed = metrics.rows[args.grpo_warmup :]

    def mean(key: str) -> float:
        return statistics.fmean(row[key] for row in timed)

    share, tokens_per_s, step_s = mean("train/generation_share"), mean("train/generation_tokens_per_s"), mean("step_s")
    row = {
        **common.record_start("grpo", args.preset, config, task.model.num_params()),
        "case": "grpo_step",
        "prompts": args.prompts,
        "group_size": args.group,
        "rows": args.prompts * args.group,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        "decoding": f"sample temperature={args.temperature} top_p=1.0, no EOS (tokenizer.eos_id None)",
        "window": config.sliding_window,
        "dtype": "float32",
        "device": "cpu",
        "ours_attention": args.attention,
        "ours_decode": "eager",
        "warmup_steps": args.grpo_warmup,
        "steps": args.steps,
        "generation_share_mean": share,
        "generation_tokens_per_s_mean": tokens_per_s,
        "step_s_mean": step_s,
        "completion_length_mean": mean("train/completion_length"),
        "per_step": timed,
    }
    if peer is not None:
        # If the rollouts ran at HF's measured speed, the rest of the step unchanged.
        gen_s = share * step_s
        hf_gen_s = gen_s * tokens_per_s / peer["hf_tokens_per_s"]
        row["hf_rollout_tokens_per_s"] = peer["hf_tokens_per_s"]
        row["ratio_ours_over_hf_in_step"] = tokens_per_s / peer["hf_tokens_per_s"]
        row["generation_share_at_hf_speed"] = hf_gen_s / (step_s - gen_s + hf_gen_s)
    return {**row, **common.environment("cpu", load_before)}


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = ModelConfig.from_name(args.preset, **model_overrides(args))
    print(
        f"GRPO rollouts: preset {args.preset} (vocab {config.vocab_size}, sliding_window {config.sliding_window}), "
        f"P={args.prompts} x G={args.group} = {args.prompts * args.group} rows, prompt {args.prompt} + {args.new} new "
        f"tokens, temperature {args.temperature}, no EOS stop, float32 on cpu, {torch.get_num_threads()} threads; "
        f"ours attention={args.attention!r} ({'compiled' if args.compile else 'eager'} decode), HF "
        f"attn_implementation={common.HF_ATTENTION!r}; torch {torch.__version__}, transformers "
        f"{common.transformers_version()}",
        flush=True,
    )
    rows = [rollout_case(args, config)]
    r = rows[0]
    print(
        f"rollout: ours {r['ours_tokens_per_s']:.1f} tok/s ({r['ours']['total_s_median']:.2f} s/call), "
        f"HF {r['hf_tokens_per_s']:.1f} tok/s ({r['hf']['total_s_median']:.2f} s/call), ours/HF "
        f"{r['ratio_ours_over_hf']:.3f} (best-call ratio {r['ratio_best_ours_over_hf']:.3f}); "
        f"{args.warmup} warmup + median of {args.repeats} interleaved calls",
        flush=True,
    )
    if not args.skip_varied:
        args.slots = args.slots or max(1, args.prompts * args.group // 4)
        v = rollout_lengths.varied_case(args, config, random_prompts(args, config))
        rows.append(v)
        rate, ratio = v["tokens_per_s"], v["ratio_over_hf"]
        print(
            f"varied lengths (total {v['lengths']['total']} tokens, median {v['lengths']['median']}, "
            f"{v['lengths']['at_limit']} of {v['rows']} rows at the limit): HF {rate['hf']:.1f} tok/s; ours with "
            f"every row at once {rate['ours_all_rows']:.1f} tok/s ({ratio['ours_all_rows']:.2f}x HF, occupancy "
            f"{v['occupancy']['ours_all_rows']:.2f}); ours with {v['slots']['ours_slots']} slots "
            f"{rate['ours_slots']:.1f} tok/s ({ratio['ours_slots']:.2f}x HF, occupancy "
            f"{v['occupancy']['ours_slots']:.2f}, peak KV {v['peak_kv_bytes']['ours_slots'] / 2**20:.2f} MiB of a "
            f"{v['kv_budget_bytes']['ours_slots'] / 2**20:.2f} MiB budget; prefill tokens "
            f"{v['prefill_tokens']['ours_slots']} for {v['rows']} rows)",
            flush=True,
        )
        roof = rollout_lengths.roofline_case(args, config, random_prompts(args, config)[0].tolist())
        rows.append(roof)
        print(
            f"decode at batch 1: {roof['ours_tokens_per_s']:.1f} tok/s against a memory-bandwidth limit of "
            f"{roof['roofline_tokens_per_s']:.1f} tok/s ({roof['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s read, "
            f"{sum(roof['bytes_per_token'].values()) / 2**20:.1f} MiB per token): "
            f"{roof['fraction_of_roofline']:.1%} of it",
            flush=True,
        )
    if not args.skip_grpo:
        g = grpo_case(args, config, r)
        rows.append(g)
        print(
            f"GRPO step ({args.steps} steps after {args.grpo_warmup} warmup, eager sampling): "
            f"train/generation_share {g['generation_share_mean']:.3f}, train/generation_tokens_per_s "
            f"{g['generation_tokens_per_s_mean']:.1f} (ours/HF rollout {g['ratio_ours_over_hf_in_step']:.3f}), "
            f"step {g['step_s_mean']:.2f} s; at HF's rollout speed the share would be "
            f"{g['generation_share_at_hf_speed']:.3f}"
        )
    out = common.append_jsonl(args.out, rows)
    print(f"\nappended {len(rows)} line(s) to {out}")


if __name__ == "__main__":
    main()
