"""`generate` and `sample`: the public API for turning prompts into tokens, on `moxin_lightning.decoding`'s engine.

Prompts of different lengths share one batch without left padding (each row keeps its own positions); requests
decode in a fixed number of slots that follows `kv_budget_bytes`, a finished row's slot going to the next
waiting prompt; a prompt repeated in the list (GRPO's group) is prefilled once. Long prompts are prefilled in
chunks (at most the cache's slot count by default), so a prompt longer than the window costs O(window) memory.

With `compile=True` the one-token decode step runs through `torch.compile` (static shapes): the per-step Python
and operator-dispatch overhead, which dominates small models and GPU decoding, mostly disappears. The first call
per slot count pays the compilation (tens of seconds on CPU).
"""

from __future__ import annotations

from moxin_lightning.decoding import DEFAULT_KV_BUDGET_BYTES, DecodeStats, Generation, Sampling, decode
from moxin_lightning.model.transformer import Transformer

__all__ = ["DEFAULT_KV_BUDGET_BYTES", "DecodeStats", "Generation", "generate", "sample"]


def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_id: int | None = None,
    seed: int | None = None,
    compile: bool = False,
    vocab_limit: int | None = None,
    prefill_chunk: int | None = None,
    kv_budget_bytes: int = DEFAULT_KV_BUDGET_BYTES,
) -> list[list[int]]:
    """New token ids for each prompt (greedy when temperature is 0); a row stops after `eos_id`.

    vocab_limit: draw only ids below it (a tokenizer smaller than the model's padded vocabulary has no text for
    the others). kv_budget_bytes: the most KV-cache memory decoding holds (greedy outputs do not depend on it;
    sampled ones are reproducible for a fixed seed and budget)."""
    sampling = Sampling(temperature, top_p, top_k, eos_id, vocab_limit, seed)
    options = dict(kv_budget_bytes=kv_budget_bytes, prefill_chunk=prefill_chunk, compile=compile)
    return decode(model, prompts, max_new_tokens, sampling, with_logprobs=False, **options).tokens


def sample(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_id: int | None = None,
    seed: int | None = None,
    prefill_chunk: int | None = None,
    compile: bool = False,
    vocab_limit: int | None = None,
    kv_budget_bytes: int = DEFAULT_KV_BUDGET_BYTES,
) -> Generation:
    """`generate` that also returns each new token's log-probability (what GRPO needs) and the engine's
    statistics (`Generation.stats`: tokens/s, slot occupancy, prefill tokens)."""
    sampling = Sampling(temperature, top_p, top_k, eos_id, vocab_limit, seed)
    options = dict(kv_budget_bytes=kv_budget_bytes, prefill_chunk=prefill_chunk, compile=compile)
    return decode(model, prompts, max_new_tokens, sampling, with_logprobs=True, **options)
