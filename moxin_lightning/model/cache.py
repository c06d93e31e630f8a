"""Rolling-buffer key/value cache for sliding-window attention (Mistral's design).

Each layer keeps `slots = min(window, max_len)` key/value rows per sequence; the token at absolute
position p lives in slot p mod slots, so memory stops growing once a sequence passes the window.
Keys are stored after RoPE, so the order of slots does not matter to attention: a per-slot index
of absolute positions (-1 = empty) is all the mask needs. Every row of the batch keeps its own
positions, which is how prompts of different lengths are decoded together without left padding.
"""

from __future__ import annotations

import torch

from moxin_lightning.model.attention import AttentionLayout
from moxin_lightning.model.config import ModelConfig


class RollingKVCache:
    """Per-layer (B, n_kv_heads, slots, head_dim) keys and values plus the position held in each slot.

    One forward step is `prepare(positions)` -> `update(layer, k, v)` for each layer -> `commit()`;
    the Transformer does this when it is given a cache. Each row must continue where it ended
    (positions never go back), as in generation: the buffer only holds a row's newest tokens.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        *,
        max_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        longest = min(max_len or config.max_seq_len, config.max_seq_len)
        self.window = config.sliding_window
        self.slots = min(self.window or longest, longest)
        shape = (batch_size, config.n_kv_heads, self.slots, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.slot_position = torch.full((batch_size, self.slots), -1, dtype=torch.long, device=device)
        self._step: _Step | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by keys and values (the per-slot position index, B x slots int64, is bookkeeping)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def batch_size(self) -> int:
        return self.slot_position.shape[0]

    @staticmethod
    def bytes_per_row(config: ModelConfig, max_len: int, dtype: torch.dtype) -> int:
        """What `nbytes` counts for one row (one sequence) of a cache for `max_len` tokens, allocating nothing."""
        return RollingKVCache(config, 1, max_len=max_len, dtype=dtype, device="meta").nbytes

    def copy_rows(self, source: RollingKVCache, source_rows: list[int], rows: list[int]) -> None:
        """Make `rows` hold what `source_rows` of `source` hold (keys, values, slot positions): a prompt prefilled
        once in a small cache is handed to the rows that continue it. Both caches need the same slot count."""
        if source.slots != self.slots:
            raise ValueError(f"cannot copy rows of a {source.slots}-slot cache into a {self.slots}-slot one")
        src = torch.tensor(source_rows, dtype=torch.long, device=self.slot_position.device)
        dst = torch.tensor(rows, dtype=torch.long, device=self.slot_position.device)
        for mine, theirs in zip((*self.keys, *self.values), (*source.keys, *source.values), strict=True):
            mine.index_copy_(0, dst, theirs.index_select(0, src))
        self.slot_position.index_copy_(0, dst, source.slot_position.index_select(0, src))

    def reset_rows(self, rows: list[int]) -> None:
        """Empty `rows` (every slot -1), so they can start a new sequence at any position; keys and values are
        left in place, as an empty slot is never attended to."""
        index = torch.tensor(rows, dtype=torch.long, device=self.slot_position.device)
        self.slot_position.index_fill_(0, index, -1)

    def keep_rows(self, rows: list[int]) -> None:
        """Shrink the cache to `rows`, in that order (row i of the result is rows[i] before): finished sequences
        stop costing compute and memory once a decoder has nothing left to put in their place."""
        index = torch.tensor(rows, dtype=torch.long, device=self.slot_position.device)
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.slot_position = self.slot_position.index_select(0, index)

    def prepare(self, positions: torch.Tensor) -> AttentionLayout:
        """Plan a step for tokens at `positions` (B, T), -1 marking padding; returns its attention layout."""
        if positions.shape[0] != self.slot_position.shape[0]:
            raise ValueError(f"batch of {positions.shape[0]} does not match the cache's {self.slot_position.shape[0]}")
        if positions.shape[1] == 1 and bool((positions >= 0).all()):
            return self._prepare_decode(positions)
        # Only a row's last `slots` tokens of this step can survive in the buffer.
        newest = positions.max(dim=1, keepdim=True).values
        keep = (positions >= 0) & (positions > newest - self.slots)
        rows, cols = keep.nonzero(as_tuple=True)
        slots = positions[rows, cols] % self.slots
        next_index = self.slot_position.clone()
        next_index[rows, slots] = positions[rows, cols]
        # The chunk attends to the old buffer plus itself, then is written.
        key_index = torch.cat((self.slot_position, positions), dim=1)
        self._step = _Step(rows, cols, slots, next_index, write_first=False)
        return AttentionLayout.cached(positions, key_index, self.window)

    def _prepare_decode(self, positions: torch.Tensor) -> AttentionLayout:
        """One new token per row: write it first, then its window is exactly the buffer's filled slots."""
        rows = torch.arange(positions.shape[0], device=positions.device)
        slots = positions[:, 0] % self.slots
        next_index = self.slot_position.clone()
        next_index[rows, slots] = positions[:, 0]
        self._step = _Step(rows, None, slots, next_index, write_first=True)
        return AttentionLayout.cached(positions, next_index, self.window)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, Hkv, T, D) keys and values; return the keys and values to attend to."""
        step = self._step
        if step is None:
            raise RuntimeError("RollingKVCache.update called before prepare(positions)")
        cache_k, cache_v = self.keys[layer], self.values[layer]
        if step.write_first:
            self._write(cache_k, cache_v, k, v, step)
            return cache_k, cache_v
        attend = torch.cat((cache_k, k), dim=2), torch.cat((cache_v, v), dim=2)
        self._write(cache_k, cache_v, k, v, step)
        return attend

    @staticmethod
    def _write(cache_k, cache_v, k, v, step: _Step) -> None:
        if step.cols is None:  # one token per row
            new_k, new_v = k[:, :, 0], v[:, :, 0]
        else:
            new_k, new_v = k[step.rows, :, step.cols], v[step.rows, :, step.cols]
        cache_k[step.rows, :, step.slots] = new_k.to(cache_k.dtype)
        cache_v[step.rows, :, step.slots] = new_v.to(cache_v.dtype)

    def commit(self) -> None:
        self.slot_position = self._step.next_index
        self._step = None


class _Step:
    """Where one step's tokens go: (row, column) in the input and the slot they land in."""

    __slots__ = ("rows", "cols", "slots", "next_index", "write_first")

    def __init__(self, rows, cols, slots, next_index, write_first):
        self.rows, self.cols, self.slots = rows, cols, slots
        self.next_index, self.write_first = next_index, write_first
