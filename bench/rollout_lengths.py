"""Two rollout cases of `bench/grpo.py` that the fixed-length case cannot show.

* varied: rollouts whose lengths vary as real ones do. Each of the P*G rows gets its own length, drawn once from
  an exponential distribution with mean `new / 2.3` and cut at `new` (seeded): most rows stop early, about one in
  ten runs to the limit. Both sides produce exactly those lengths from the same weights: ours through
  `moxin_lightning.decoding.decode` with one token limit per row (what an EOS does to a row), HF through
  `generate(do_sample=True)` with a per-row `StoppingCriteria` that ends row i after its length (HF then pads the
  finished rows until the longest ends, as it does at EOS). Ours runs twice: with a KV budget for every row at
  once (no continuous batching: finished rows idle as HF's do) and with a budget for `--slots` rows (a finished
  row's slot takes the next waiting rollout). Reported: generated tokens/s of each, the engine's slot occupancy,
  its peak KV bytes against the budget, and the ratios to HF.
* roofline: decode at batch 1 against the memory-bandwidth limit of this machine. Every new token reads all the
  weights but the embedding table (one row of it) and the keys and values in the cache; bytes per token / a
  measured read bandwidth (the best `sum` over a 512 MiB float32 tensor) = the fastest possible seconds per
  token. Reported: our tokens/s, that limit, and the fraction reached.
"""

from __future__ import annotations

import os
import statistics
import time

import common
import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from moxin_lightning.decoding import Sampling, decode
from moxin_lightning.model.cache import RollingKVCache
from moxin_lightning.model.config import ModelConfig


def rollout_lengths(rows: int, new: int, seed: int) -> list[int]:
    """Seeded lengths in [1, new]: exponential with mean new / 2.3, cut at new (about 10% reach it)."""
    draws = np.random.default_rng(seed).exponential(new / 2.3, rows)
    return [int(min(new, max(1, np.ceil(value)))) for value in draws]


class StopAtLengths(StoppingCriteria):
    """Ends row i once it has `lengths[i]` new tokens (HF pads it from then on, as after an EOS)."""

    def __init__(self, prompt_length: int, lengths: list[int]) -> None:
        self.prompt_length = prompt_length
        self.lengths = torch.tensor(lengths)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return (input_ids.shape[1] - self.prompt_length) >= self.lengths


def varied_case(args, config: ModelConfig, prompts: torch.Tensor) -> dict:
    ours, hf = common.build_models(config, torch.float32, "cpu", args.seed)
    ours.eval()
    hf.eval()
    rows, prompt_length = prompts.shape
    lengths = rollout_lengths(rows, args.new, args.seed)
    total = sum(lengths)
    per_row = RollingKVCache.bytes_per_row(config, prompt_length + args.new, torch.float32)
    budgets = {"ours_all_rows": (rows + 1) * per_row, "ours_slots": (args.slots + 1) * per_row}
    listed = prompts.tolist()

    def run_ours(budget: int, seed: int):
        sampling = Sampling(temperature=args.temperature, seed=seed)
        generation = decode(ours, listed, lengths, sampling, kv_budget_bytes=budget, compile=args.compile)
        if [len(tokens) for tokens in generation.tokens] != lengths:
            raise RuntimeError("ours did not produce the drawn lengths")
        return generation.stats

    @torch.inference_mode()
    def run_hf(seed: int):
        torch.manual_seed(seed)
        out = hf.generate(
            input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new, do_sample=True,
            temperature=args.temperature, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=None,
            stopping_criteria=StoppingCriteriaList([StopAtLengths(prompt_length, lengths)]),
        )  # fmt: skip
        if out.shape[1] - prompt_length != max(lengths):
            raise RuntimeError(f"HF ran {out.shape[1] - prompt_length} steps, expected {max(lengths)}")
        return None

    runners = {
        "ours_all_rows": lambda seed: run_ours(budgets["ours_all_rows"], seed),
        "ours_slots": lambda seed: run_ours(budgets["ours_slots"], seed),
        "hf": run_hf,
    }
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    stats = {}
    load_before = os.getloadavg()[0]
    for round_ in range(args.warmup + args.repeats):
        order = list(runners) if round_ % 2 == 0 else list(reversed(runners))
        for name in order:
            start = time.perf_counter()
            result = runners[name](args.seed + round_)
            elapsed = time.perf_counter() - start
            if round_ >= args.warmup:
                seconds[name].append(elapsed)
                if result is not None:
                    stats[name] = result
    tokens_per_s = {name: total / statistics.median(values) for name, values in seconds.items()}
    return {
        **common.record_start("grpo", args.preset, config, ours.num_params()),
        "case": "rollout_varied_lengths",
        "rows": rows,
        "prompts": args.prompts,
        "group_size": args.group,
        "prompt_tokens": prompt_length,
        "max_new_tokens": args.new,
        "lengths": {"total": total, "median": statistics.median(lengths), "at_limit": lengths.count(args.new)},
        "ours_decode": "torch.compile" if args.compile else "eager",
        "slots": {name: stats[name].slots for name in ("ours_all_rows", "ours_slots")},
        "occupancy": {name: stats[name].occupancy for name in ("ours_all_rows", "ours_slots")},
        "prefill_tokens": {name: stats[name].prefill_tokens for name in ("ours_all_rows", "ours_slots")},
        "peak_kv_bytes": {name: stats[name].peak_kv_bytes for name in ("ours_all_rows", "ours_slots")},
        "kv_budget_bytes": budgets,
        "tokens_per_s": tokens_per_s,
        "ratio_over_hf": {name: tokens_per_s[name] / tokens_per_s["hf"] for name in ("ours_all_rows", "ours_slots")},
        "seconds_all": seconds,
        **common.environment("cpu", load_before),
    }


def read_bandwidth(repeats: int = 5) -> float:
    """Bytes per second of the best `sum` over a 512 MiB float32 tensor (a streaming read of memory)."""
    data = torch.ones(2**27)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * data.element_size() / best


def roofline_case(args, config: ModelConfig, prompt: list[int]) -> dict:
    ours, _ = common.build_models(config, torch.float32, "cpu", args.seed)
    ours.eval()
    new = args.new
    sampling = Sampling(temperature=args.temperature, seed=args.seed)
    decode(ours, [prompt], new, sampling)  # warm-up
    runs = []
    for repeat in range(args.repeats):
        stats = decode(ours, [prompt], new, Sampling(temperature=args.temperature, seed=args.seed + repeat)).stats
        runs.append(stats.new_tokens / stats.seconds)
    tokens_per_s = statistics.median(runs)
    weights = sum(p.numel() * p.element_size() for p in ours.parameters()) - ours.embed.weight[1:].numel() * 4
    per_position = config.n_layers * 2 * config.n_kv_heads * config.head_dim * 4  # keys and values of one token
    window = config.sliding_window or config.max_seq_len
    cached = statistics.mean(min(len(prompt) + step, window) for step in range(new)) * per_position
    bandwidth = read_bandwidth()
    limit = bandwidth / (weights + cached)
    return {
        **common.record_start("grpo", args.preset, config, ours.num_params()),
        "case": "decode_roofline_batch1",
        "prompt_tokens": len(prompt),
        "new_tokens": new,
        "bytes_per_token": {"weights": weights, "kv_cache_mean": cached},
        "read_bandwidth_bytes_per_s": bandwidth,
        "roofline_tokens_per_s": limit,
        "ours_tokens_per_s": tokens_per_s,
        "fraction_of_roofline": tokens_per_s / limit,
        **common.environment("cpu", os.getloadavg()[0]),
    }
