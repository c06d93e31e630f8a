"""Batched sampling on the rolling-buffer KV cache; used by GRPO rollouts and the `generate` command.

Prompts of different lengths share one batch without left padding: each row keeps its own
positions, prompts are right-padded and the padding is never written to the cache. Prompts are
prefilled in chunks (at most the cache's slot count by default), so a prompt longer than the
window costs O(window) memory, then every row decodes one token per step.

With `compile=True` the one-token decode step runs through `torch.compile` (static shapes): the
per-step Python and operator-dispatch overhead, which dominates small models and GPU decoding,
mostly disappears. The first call per batch size pays the compilation (tens of seconds on CPU).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moxin_lightning.model.attention import AttentionLayout
from moxin_lightning.model.cache import RollingKVCache
from moxin_lightning.model.transformer import Transformer


@dataclass
class Generation:
    """New tokens per prompt, and their log-probabilities under the model (untempered softmax)."""

    tokens: list[list[int]]
    logprobs: list[list[float]]


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
) -> list[list[int]]:
    """New token ids for each prompt (greedy when temperature is 0); a row stops after `eos_id`.

    vocab_limit: draw only ids below it (a tokenizer smaller than the model's padded vocabulary has no text for
    the others)."""
    settings = _Settings(temperature, top_p, top_k, eos_id, seed, None, compile, False, vocab_limit)
    return _generate(model, prompts, max_new_tokens, settings).tokens


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
) -> Generation:
    """`generate` that also returns each new token's log-probability (what GRPO needs)."""
    settings = _Settings(temperature, top_p, top_k, eos_id, seed, prefill_chunk, compile, True, None)
    return _generate(model, prompts, max_new_tokens, settings)


@dataclass(frozen=True)
class _Settings:
    temperature: float
    top_p: float
    top_k: int
    eos_id: int | None
    seed: int | None
    prefill_chunk: int | None
    compile: bool
    with_logprobs: bool
    vocab_limit: int | None


DecodeStep = Callable[[torch.Tensor, torch.Tensor, AttentionLayout, RollingKVCache], torch.Tensor]
_COMPILED_STEPS: weakref.WeakKeyDictionary[Transformer, DecodeStep] = weakref.WeakKeyDictionary()


def _decode_step(model: Transformer, compile: bool) -> DecodeStep:
    """(token, positions, layout, cache) -> fp32 next-token logits; compiled once per model when asked."""

    def step(token, positions, layout, cache):
        return model.lm_head(model.run_layers(token, positions, layout, cache))[:, -1].float()

    if not compile:
        return step
    if model not in _COMPILED_STEPS:
        _COMPILED_STEPS[model] = torch.compile(step, dynamic=False)
    return _COMPILED_STEPS[model]


@torch.inference_mode()
def _generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, settings: _Settings) -> Generation:
    temperature, top_p, top_k, eos_id = settings.temperature, settings.top_p, settings.top_k, settings.eos_id
    config = model.config
    _check_request(prompts, max_new_tokens, temperature, top_p, top_k, config.vocab_size)
    longest = max(len(p) for p in prompts) + max_new_tokens
    if longest > config.max_seq_len:
        raise ValueError(
            f"prompt plus {max_new_tokens} new tokens reaches {longest} tokens, beyond "
            f"max_seq_len={config.max_seq_len}; shorten the prompt or ask for fewer tokens"
        )
    param = next(model.parameters())
    device = param.device
    batch = len(prompts)
    cache = RollingKVCache(config, batch, max_len=longest, dtype=param.dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(settings.seed) if settings.seed is not None else None

    lengths = torch.tensor([len(p) for p in prompts], device=device)
    logits = _prefill(model, prompts, lengths, cache, settings.prefill_chunk or cache.slots)

    new_tokens = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
    new_logprobs = torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    decode = _decode_step(model, settings.compile)
    produced = max_new_tokens
    for step in range(max_new_tokens):
        token = _pick(within_vocabulary(logits, settings.vocab_limit), temperature, top_p, top_k, generator)
        new_tokens[:, step] = token
        if settings.with_logprobs:
            new_logprobs[:, step] = torch.log_softmax(logits, dim=-1).gather(1, token.unsqueeze(1)).squeeze(1)
        if eos_id is not None:
            done |= token == eos_id
        if step + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
            produced = step + 1
            break
        # Finished rows keep stepping (their output is discarded) so every step has one shape.
        positions = (lengths + step).unsqueeze(1)
        logits = decode(token.unsqueeze(1), positions, cache.prepare(positions), cache)
        cache.commit()

    return _trim(new_tokens[:, :produced], new_logprobs[:, :produced], eos_id)


def _prefill(
    model: Transformer, prompts: list[list[int]], lengths: torch.Tensor, cache: RollingKVCache, chunk: int
) -> torch.Tensor:
    """Run the right-padded prompts through the cache chunk by chunk; logits after each row's last token."""
    batch, device = len(prompts), lengths.device
    padded = torch.zeros(batch, int(lengths.max()), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        padded[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    index = torch.arange(padded.shape[1], device=device)
    positions = torch.where(index < lengths.unsqueeze(1), index, -1)  # -1: padding, never cached
    last_hidden = None
    for start in range(0, padded.shape[1], chunk):
        hidden = model.hidden_states(
            padded[:, start : start + chunk], positions=positions[:, start : start + chunk], cache=cache
        )
        if last_hidden is None:
            last_hidden = hidden.new_zeros(batch, hidden.shape[-1])
        last = lengths - 1 - start
        rows = ((last >= 0) & (last < hidden.shape[1])).nonzero().flatten()
        last_hidden[rows] = hidden[rows, last[rows]]
    return model.lm_head(last_hidden).float()


def within_vocabulary(logits: torch.Tensor, vocab_limit: int | None) -> torch.Tensor:
    """`logits` with the ids at or beyond `vocab_limit` ruled out (unchanged when there are none)."""
    if vocab_limit is None or vocab_limit >= logits.shape[-1]:
        return logits
    return logits.index_fill(-1, torch.arange(vocab_limit, logits.shape[-1], device=logits.device), -torch.inf)


def _pick(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else a draw from the top-k / top-p filtered softmax."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def _trim(tokens: torch.Tensor, logprobs: torch.Tensor, eos_id: int | None) -> Generation:
    """Lists per row, cut just after the row's first EOS (kept, as the end marker)."""
    out_tokens, out_logprobs = [], []
    for row_tokens, row_logprobs in zip(tokens.tolist(), logprobs.tolist(), strict=True):
        end = row_tokens.index(eos_id) + 1 if eos_id is not None and eos_id in row_tokens else len(row_tokens)
        out_tokens.append(row_tokens[:end])
        out_logprobs.append(row_logprobs[:end])
    return Generation(out_tokens, out_logprobs)


def _check_request(
    prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float, top_k: int, vocab_size: int
) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start it with the BOS id)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not (math.isfinite(temperature) and temperature >= 0) or not 0 < top_p <= 1 or top_k < 0:  # NaN fails too
        raise ValueError(
            f"need a finite temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}"
        )
    bad = [t for p in prompts for t in p if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the model's vocabulary of {vocab_size}; check the tokenizer")
