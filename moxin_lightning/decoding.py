"""The one batched decoder: continuous batching on a rolling-buffer KV cache sized by a memory budget.

Every caller that turns prompts into tokens goes through here: `generate.generate` / `generate.sample` (eval,
release samples, the demo, GRPO's rollouts) and the `generate` command's `DecodeSession`, so they share one set
of guarantees (greedy equals a full recompute, `vocab_limit` is respected, log-probs are the model's).

Decoding keeps a fixed number of slots: the rows of one `RollingKVCache`. Requests wait in a queue; when a row
ends (EOS or its own token limit) the next pending request is prefilled and copied into that row, so compute
follows the live sequences instead of the longest one. The slot count follows a KV-memory budget in bytes
(`kv_budget_bytes`), counted with the cache's own `nbytes` per row, and is capped by the number of requests.

A new prompt is prefilled in a small staging cache (right-padded, chunked, padding never cached) and its rows
copied into the free slots. Requests with the same prompt (GRPO's G completions of one prompt) are queued
together and share one prefill: the prompt's staged row is copied into each of their slots. The staging cache
counts against the budget too, so the engine's KV memory never exceeds it.

While requests wait, decode steps keep one shape (one token for each slot): a row without work steps at position
0 with its output discarded and is refilled at the next step. Once the queue is empty, rows that end are no
longer computed: when at most half the rows are live, the cache shrinks to the live rows (`keep_rows`), so the
tail of a batch whose lengths vary (most rows end early, a few run to the limit) costs what its live rows cost.
Each shrink at least halves the rows, so `compile=True` compiles the step at most log2(slots) + 1 times.
"""

from __future__ import annotations

import math
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from moxin_lightning.model.attention import AttentionLayout
from moxin_lightning.model.cache import RollingKVCache
from moxin_lightning.model.transformer import Transformer

DEFAULT_KV_BUDGET_BYTES = 8 * 2**30
"""8 GiB: 14 rows of Moxin-7B's bf16 cache at its full 4096-token window (576 MiB each; one row stages prefills,
so 13 slots), thousands for small models; a short request's row is smaller (min(window, prompt + new tokens))."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at temperature 0, else a draw from the top-k / top-p filtered softmax.

    eos_id: a row ends after drawing it (kept, as the end marker). vocab_limit: draw only ids below it (a tokenizer
    smaller than the model's padded vocabulary has no text for the others). seed: of the one generator all draws
    use, so a run is reproducible for a fixed seed and budget."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    eos_id: int | None = None
    vocab_limit: int | None = None
    seed: int | None = None


@dataclass
class DecodeStats:
    """What one run did: the numbers GRPO logs and the benchmarks report."""

    slots: int = 0
    requests: int = 0
    new_tokens: int = 0
    decode_steps: int = 0
    live_row_steps: int = 0  # summed over decode steps: rows whose output was kept
    row_steps: int = 0  # summed over decode steps: rows computed (live or idle)
    prefills: int = 0  # prompts run through the model (a prompt shared by a group counts once)
    prefill_tokens: int = 0
    peak_kv_bytes: int = 0  # slots' cache plus staging cache, at their largest
    seconds: float = 0.0

    @property
    def occupancy(self) -> float:
        """Live rows / rows computed, over all decode steps (1.0: no row was ever computed for nothing)."""
        return self.live_row_steps / self.row_steps if self.row_steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Generation:
    """New tokens per prompt, and their log-probabilities under the model (untempered softmax)."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    stats: DecodeStats | None = field(default=None, compare=False)


@torch.no_grad()  # not inference_mode: FSDP2 gathers weights here into buffers that training writes again
def decode(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int | Sequence[int],
    sampling: Sampling = Sampling(),
    *,
    kv_budget_bytes: int = DEFAULT_KV_BUDGET_BYTES,
    prefill_chunk: int | None = None,
    compile: bool = False,
    with_logprobs: bool = True,
) -> Generation:
    """New tokens for each prompt (in the prompts' order), each request ending at EOS or its own token limit.

    max_new_tokens: one limit for all, or one per prompt. kv_budget_bytes: the most KV-cache memory this call
    holds; it sets how many rows decode at once (outputs are greedy-identical whatever it is). prefill_chunk:
    prompt tokens per prefill forward (default: the cache's slot count, so long prompts cost O(window))."""
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise ValueError(f"{len(limits)} token limits for {len(prompts)} prompts")
    check_request(prompts, min(limits, default=1), sampling, model.config.vocab_size)
    _check_lengths(prompts, limits, model.config.max_seq_len)
    started = time.perf_counter()
    run = _Run(model, prompts, limits, sampling, kv_budget_bytes, prefill_chunk, compile, with_logprobs)
    generation = run.loop()
    run.stats.seconds = time.perf_counter() - started
    return generation


class _Run:
    """One call's state: the slots' cache, the queue, the staging cache and each request's output so far."""

    def __init__(self, model, prompts, limits, sampling, budget, prefill_chunk, compile, with_logprobs) -> None:
        param = next(model.parameters())
        self.model, self.prompts, self.limits, self.sampling = model, prompts, limits, sampling
        self.device, self.with_logprobs = param.device, with_logprobs
        self.budget = budget
        max_len = max(len(p) + n for p, n in zip(prompts, limits, strict=True))
        rows = _rows_within_budget(model, max_len, param.dtype, budget)
        keys = [tuple(p) for p in prompts]
        first_seen = {key: index for index, key in reversed(list(enumerate(keys)))}
        # Requests with the same prompt queue together, so one staged prefill serves the whole group.
        self.pending = deque(sorted(range(len(prompts)), key=lambda i: first_seen[keys[i]]))
        slots = min(len(prompts), rows - 1)
        self.staging_rows = max(1, min(len(first_seen), rows - slots))
        self.cache = RollingKVCache(model.config, slots, max_len=max_len, dtype=param.dtype, device=self.device)
        self.max_len, self.dtype = max_len, param.dtype
        self.chunk = prefill_chunk or self.cache.slots
        self.staging: RollingKVCache | None = None
        self.staged: dict[tuple[int, ...], int] = {}  # prompt -> its row in the staging cache
        self.staged_logits: torch.Tensor | None = None
        self.slot_request: list[int | None] = [None] * slots
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.logprobs: list[list[float]] = [[] for _ in prompts]
        self.step = decode_step(model, compile)
        self.generator = None
        if sampling.seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        self.stats = DecodeStats(slots=slots, requests=len(prompts))

    def loop(self) -> Generation:
        slots = len(self.slot_request)
        logits = torch.zeros(slots, self.model.config.vocab_size, device=self.device)
        while True:
            self._admit(logits)
            live = [s for s, request in enumerate(self.slot_request) if request is not None]
            if not live:
                break
            tokens, logprobs = self._draw(logits)
            continuing = self._record(live, tokens, logprobs)
            if continuing and not self.pending and len(continuing) <= self.cache.batch_size // 2:
                continuing, tokens = self._shrink(continuing, tokens)
            if continuing:
                logits = self._decode(continuing, tokens)
        return Generation(self.tokens, self.logprobs, self.stats)

    def _draw(self, logits: torch.Tensor) -> tuple[list[int], list[float] | None]:
        s = self.sampling
        token = pick(within_vocabulary(logits, s.vocab_limit), s.temperature, s.top_p, s.top_k, self.generator)
        logprobs = None
        if self.with_logprobs:
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, token.unsqueeze(1)).squeeze(1).tolist()
        return token.tolist(), logprobs

    def _record(self, live: list[int], tokens: list[int], logprobs: list[float] | None) -> list[int]:
        """Append each live row's token; free the rows that end; return the rows that continue."""
        continuing, ended = [], []
        for slot in live:
            request = self.slot_request[slot]
            self.tokens[request].append(tokens[slot])
            if logprobs is not None:
                self.logprobs[request].append(logprobs[slot])
            if tokens[slot] == self.sampling.eos_id or len(self.tokens[request]) == self.limits[request]:
                ended.append(slot)
                self.slot_request[slot] = None
            else:
                continuing.append(slot)
        self.stats.new_tokens += len(live)
        if ended:
            self.cache.reset_rows(ended)
        return continuing

    def _shrink(self, continuing: list[int], tokens: list[int]) -> tuple[list[int], list[int]]:
        """Keep only the continuing rows (nothing waits to take the others): they become rows 0..n-1."""
        self.cache.keep_rows(continuing)
        self.slot_request = [self.slot_request[slot] for slot in continuing]
        return list(range(len(continuing))), [tokens[slot] for slot in continuing]

    def _decode(self, continuing: list[int], tokens: list[int]) -> torch.Tensor:
        """One token for every slot: the continuing rows' new tokens, position 0 (output ignored) for the rest."""
        alive = set(continuing)
        step_tokens, positions = [0] * len(tokens), [0] * len(tokens)
        for slot in continuing:
            request = self.slot_request[slot]
            step_tokens[slot] = tokens[slot]
            positions[slot] = len(self.prompts[request]) + len(self.tokens[request]) - 1
        token = torch.tensor(step_tokens, device=self.device).unsqueeze(1)
        position = torch.tensor(positions, device=self.device).unsqueeze(1)
        logits = self.step(token, position, self.cache.prepare(position), self.cache)
        self.cache.commit()
        self.stats.decode_steps += 1
        self.stats.live_row_steps += len(alive)
        self.stats.row_steps += len(tokens)
        return logits

    def _admit(self, logits: torch.Tensor) -> None:
        """Fill free slots from the queue, in order: copy each request's staged prompt into its slot."""
        free = [s for s, request in enumerate(self.slot_request) if request is None]
        sources, targets = [], []
        while free and self.pending:
            request = self.pending[0]
            key = tuple(self.prompts[request])
            if key not in self.staged:
                self._copy(sources, targets, logits)
                sources, targets = [], []
                self._stage(len(free))
            slot = free.pop(0)
            self.pending.popleft()
            sources.append(self.staged[key])
            targets.append(slot)
            self.slot_request[slot] = request
        self._copy(sources, targets, logits)

    def _copy(self, sources: list[int], targets: list[int], logits: torch.Tensor) -> None:
        if targets:
            self.cache.copy_rows(self.staging, sources, targets)
            logits[targets] = self.staged_logits[sources]

    def _stage(self, room: int) -> None:
        """Prefill the next distinct prompts of the queue (as many as free slots and staging rows allow)."""
        distinct: list[tuple[int, ...]] = []
        for request in list(self.pending)[:room]:
            key = tuple(self.prompts[request])
            if key not in distinct:
                distinct.append(key)
            if len(distinct) == self.staging_rows:
                break
        self.staging = self.staged_logits = None  # freed before the next one is allocated
        config = self.model.config
        self.staging = RollingKVCache(config, len(distinct), max_len=self.max_len, dtype=self.dtype, device=self.device)
        self.staged_logits = prefill(self.model, [list(k) for k in distinct], self.staging, self.chunk)
        self.staged = {key: row for row, key in enumerate(distinct)}
        self.stats.prefills += len(distinct)
        self.stats.prefill_tokens += sum(len(k) for k in distinct)
        used = self.cache.nbytes + self.staging.nbytes
        self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, used)


def _rows_within_budget(model: Transformer, max_len: int, dtype: torch.dtype, budget: int) -> int:
    """Cache rows (slots plus staging) the budget holds; at least two (one slot and one prefill row)."""
    per_row = RollingKVCache.bytes_per_row(model.config, max_len, dtype)
    rows = budget // per_row
    if rows < 2:
        raise ValueError(
            f"a request of {max_len} tokens needs {2 * per_row} bytes of KV cache (its slot and its prefill row), "
            f"beyond kv_budget_bytes={budget}; raise kv_budget_bytes or shorten the request"
        )
    return rows


def prefill(
    model: Transformer,
    prompts: list[list[int]],
    cache: RollingKVCache,
    chunk: int,
    start: list[int] | None = None,
) -> torch.Tensor:
    """Run right-padded prompts through `cache` chunk by chunk, row r continuing at position start[r] (default
    0); fp32 logits after each row's last token. Padding has position -1 and is never cached."""
    device = cache.slot_position.device
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    offsets = torch.tensor(start or [0] * batch, device=device).unsqueeze(1)
    padded = torch.zeros(batch, int(lengths.max()), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        padded[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    index = torch.arange(padded.shape[1], device=device)
    positions = torch.where(index < lengths.unsqueeze(1), index + offsets, -1)
    logits = None
    for begin in range(0, padded.shape[1], chunk):
        piece = slice(begin, begin + chunk)
        width = min(chunk, padded.shape[1] - begin)
        last = lengths - 1 - begin
        inside = (last >= 0) & (last < width)
        # Through the model's forward (sharding wrappers gather what they hold), asking only for the logits after
        # each row's last prompt token when it falls in this chunk (any column otherwise, discarded).
        chunk_logits = model(
            padded[:, piece], positions=positions[:, piece], cache=cache, logits_at=last.clamp(0, width - 1)
        ).float()
        logits = chunk_logits if logits is None else torch.where(inside.unsqueeze(1), chunk_logits, logits)
    return logits


DecodeStep = Callable[[torch.Tensor, torch.Tensor, AttentionLayout, RollingKVCache], torch.Tensor]
_COMPILED_STEPS: weakref.WeakKeyDictionary[Transformer, DecodeStep] = weakref.WeakKeyDictionary()


def decode_step(model: Transformer, compile: bool) -> DecodeStep:
    """(token, positions, layout, cache) -> fp32 next-token logits; compiled once per model when asked (static
    shapes: the per-step Python and dispatch overhead that dominates small models and GPU decoding goes away)."""

    def step(token, positions, layout, cache):
        return model.head(model.run_layers(token, positions, layout, cache))[:, -1].float()

    if not compile:
        return step
    if model not in _COMPILED_STEPS:
        _COMPILED_STEPS[model] = torch.compile(step, dynamic=False)
    return _COMPILED_STEPS[model]


def within_vocabulary(logits: torch.Tensor, vocab_limit: int | None) -> torch.Tensor:
    """`logits` with the ids at or beyond `vocab_limit` ruled out (unchanged when there are none)."""
    if vocab_limit is None or vocab_limit >= logits.shape[-1]:
        return logits
    return logits.index_fill(-1, torch.arange(vocab_limit, logits.shape[-1], device=logits.device), -torch.inf)


def pick(
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
    return draw(logits.softmax(dim=-1), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One id per row of `probs` by inverting its cumulative sum at one uniform draw per row.

    The same distribution as `torch.multinomial(probs, 1)`, which on CPU draws a random number per vocabulary
    entry: 22 ms a step for 32 rows of a 32K vocabulary here, against 0.6 ms for this (`bench/grpo.py` rows). The
    sum runs in float64 so rounding cannot shift mass between ids; an id of zero probability is never drawn
    (searching to the right of equal sums skips it)."""
    cumulative = probs.double().cumsum(dim=-1)
    uniform = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
    index = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True).squeeze(1)
    return index.clamp_(max=probs.shape[-1] - 1)


def check_request(prompts: list[list[int]], max_new_tokens: int, sampling: Sampling, vocab_size: int) -> None:
    """One-line errors for requests the decoder cannot serve."""
    temperature, top_p, top_k = sampling.temperature, sampling.top_p, sampling.top_k
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


def _check_lengths(prompts: list[list[int]], limits: list[int], max_seq_len: int) -> None:
    for prompt, new in zip(prompts, limits, strict=True):
        if len(prompt) + new > max_seq_len:
            raise ValueError(
                f"prompt plus {new} new tokens reaches {len(prompt) + new} tokens, beyond "
                f"max_seq_len={max_seq_len}; shorten the prompt or ask for fewer tokens"
            )
