"""Attention kernels behind one signature: `kernel(q, k, v, layout) -> out`.

q is (B, Hq, Tq, D); k and v are (B, Hkv, Tk, D) with Hq a multiple of Hkv (grouped-query
attention is handled by each kernel, never by copying k and v). `AttentionLayout` says who may
attend to whom: causal order, the sliding window, document boundaries of packed sequences,
and, when decoding with a rolling cache, the absolute index of every query and key.
The layout is built once per forward and shared by all layers, so a mask is built once.

A new kernel is a function registered with `@register_kernel("name")`; the model picks it by
`ModelConfig.attention`. The window follows Hugging Face: a query sees `window` keys, itself included.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "AttentionLayout"], torch.Tensor]


@dataclass
class AttentionLayout:
    """Visibility rules of one forward pass.

    Self-attention (training, full re-scoring): `q_index` and `k_index` are None and query i sees key j
    when j <= i, i - j < window, and both lie in the same document (`doc_ids`, optional).
    Cached attention (generation): `q_index` (B, Tq) and `k_index` (B, Tk) hold each token's absolute
    position in its sequence, -1 for padding queries or empty cache slots, and the same rule applies
    to those positions. Keys may come in any order (a rolling buffer is not chronological).
    """

    q_len: int
    k_len: int
    window: int | None
    doc_ids: torch.Tensor | None = None
    q_index: torch.Tensor | None = None
    k_index: torch.Tensor | None = None
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def self_attention(cls, length: int, window: int | None, doc_ids: torch.Tensor | None = None) -> AttentionLayout:
        return cls(q_len=length, k_len=length, window=window, doc_ids=doc_ids)

    @classmethod
    def cached(cls, q_index: torch.Tensor, k_index: torch.Tensor, window: int | None) -> AttentionLayout:
        return cls(q_len=q_index.shape[1], k_len=k_index.shape[1], window=window, q_index=q_index, k_index=k_index)

    @property
    def is_cached(self) -> bool:
        return self.q_index is not None

    @property
    def is_plain_causal(self) -> bool:
        """Causal self-attention that the window never cuts and no document boundary splits."""
        return not self.is_cached and self.doc_ids is None and (self.window is None or self.q_len <= self.window)

    def memo(self, key: str, build: Callable[[], Any]) -> Any:
        """Build a kernel's mask once per forward and reuse it in every layer."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def dense_mask(self, device: torch.device) -> torch.Tensor:
        """Boolean mask (True = may attend), broadcastable to (B, 1, Tq, Tk)."""
        return self.memo("dense", lambda: self._build_dense_mask(device))

    def _build_dense_mask(self, device: torch.device) -> torch.Tensor:
        if self.is_cached:
            q = self.q_index.unsqueeze(-1)
            k = self.k_index.unsqueeze(-2)
            visible = (k >= 0) & (k <= q)
            if self.window is not None:
                visible &= (q - k) < self.window
            # Padding queries see nothing; give them every key so softmax stays finite (output unused).
            visible |= ~visible.any(dim=-1, keepdim=True)
            return visible.unsqueeze(1)
        band = banded_causal_mask(self.q_len, self.window, device)
        if self.doc_ids is None:
            return band
        same_doc = self.doc_ids.unsqueeze(-1) == self.doc_ids.unsqueeze(-2)
        return (band & same_doc).unsqueeze(1)


@functools.lru_cache(maxsize=16)
def banded_causal_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(T, T) boolean mask: key j visible to query i iff 0 <= i - j < window. Cached per shape."""
    index = torch.arange(length, device=device)
    distance = index.unsqueeze(1) - index.unsqueeze(0)
    visible = distance >= 0
    if window is not None:
        visible &= distance < window
    return visible


# ----------------------------------------------------------------------------------------------
# registry

_KERNELS: dict[str, Kernel] = {}
_REQUIREMENTS: dict[str, Callable[[], None]] = {}


def register_kernel(name: str, requires: Callable[[], None] | None = None) -> Callable[[Kernel], Kernel]:
    """Register an attention kernel under `name`; `requires` raises if it cannot run here."""

    def decorator(fn: Kernel) -> Kernel:
        _KERNELS[name] = fn
        if requires is not None:
            _REQUIREMENTS[name] = requires
        return fn

    return decorator


def available_kernels() -> list[str]:
    return sorted(_KERNELS)


def get_kernel(name: str) -> Kernel:
    """The kernel registered as `name`, after checking that its package is installed."""
    if name not in _KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; choose one of: {', '.join(available_kernels())}")
    if name in _REQUIREMENTS:
        _REQUIREMENTS[name]()
    return _KERNELS[name]


def _uses_gqa(q: torch.Tensor, k: torch.Tensor) -> bool:
    return q.shape[1] != k.shape[1]


# ----------------------------------------------------------------------------------------------
# sdpa: PyTorch's scaled_dot_product_attention (flash / memory-efficient / math backends)


@register_kernel("sdpa")
def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    """is_causal fast path when the window cannot cut the sequence; a cached boolean mask otherwise."""
    gqa = _uses_gqa(q, k)
    if layout.is_plain_causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense_mask(q.device), enable_gqa=gqa)


# ----------------------------------------------------------------------------------------------
# flex: torch FlexAttention with a block mask = causal & window & same document


def _flex_block_mask(layout: AttentionLayout, device: torch.device, batch: int):
    from torch.nn.attention.flex_attention import create_block_mask

    window = layout.window
    if layout.is_cached:
        q_index, k_index = layout.q_index, layout.k_index

        def mask_mod(b, h, q_idx, kv_idx):
            qp, kp = q_index[b, q_idx], k_index[b, kv_idx]
            visible = (kp >= 0) & (kp <= qp)
            if window is not None:
                visible = visible & (qp - kp < window)
            return visible | (qp < 0)  # padding queries: any key, output unused

        return create_block_mask(mask_mod, batch, None, layout.q_len, layout.k_len, device=device)
    if layout.doc_ids is None:
        return _cached_flex_causal_mask(layout.q_len, window, device)
    doc_ids = layout.doc_ids

    def doc_mask_mod(b, h, q_idx, kv_idx):
        visible = (kv_idx <= q_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        if window is not None:
            visible = visible & (q_idx - kv_idx < window)
        return visible

    return create_block_mask(doc_mask_mod, batch, None, layout.q_len, layout.k_len, device=device)


@functools.lru_cache(maxsize=8)
def _cached_flex_causal_mask(length: int, window: int | None, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        visible = kv_idx <= q_idx
        if window is not None:
            visible = visible & (q_idx - kv_idx < window)
        return visible

    return create_block_mask(mask_mod, None, None, length, length, device=device)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@register_kernel("flex")
def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    """Compiled on CUDA; eager (forward only, PyTorch has no CPU backward) on CPU."""
    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    on_cpu = q.device.type == "cpu"
    if on_cpu and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError(
            "attention='flex' has no backward pass on CPU in PyTorch; train on CPU with attention='sdpa'"
        )
    block_mask = layout.memo("flex", lambda: _flex_block_mask(layout, q.device, q.shape[0]))
    if on_cpu:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return eager_flex(q, k, v, block_mask=block_mask, enable_gqa=_uses_gqa(q, k))
    return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=_uses_gqa(q, k))


# ----------------------------------------------------------------------------------------------
# flash: flash-attn 2 (optional extra), varlen for packed documents, left window W - 1


def _require_flash_attn() -> None:
    if importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "attention='flash' needs flash-attn: pip install 'moxin_lightning[flash]' on a CUDA machine, "
            "or choose attention='sdpa'"
        )


def _cu_seqlens(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative document lengths over the flattened batch, as flash-attn's varlen API wants."""
    batch, length = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_offsets = starts.flatten().nonzero().flatten()
    total = torch.tensor([batch * length], device=doc_ids.device)
    cu_seqlens = torch.cat((start_offsets, total)).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


@register_kernel("flash", requires=_require_flash_attn)
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    """flash-attn's causal kernel; its `window_size=(W - 1, 0)` equals our W keys including the query."""
    if q.device.type != "cuda":
        raise RuntimeError("attention='flash' runs on CUDA only; use attention='sdpa' on this device")
    if layout.is_cached:
        # flash-attn has no kernel for a ring buffer addressed by position: decode steps use SDPA.
        return sdpa_attention(q, k, v, layout)
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(
            f"attention='flash' needs fp16/bf16 inputs, got {q.dtype}; use precision='bf16-mixed' or attention='sdpa'"
        )
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    window = (layout.window - 1, 0) if layout.window is not None else (-1, -1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, H, D)
    if layout.doc_ids is None:
        out = flash_attn_func(q, k, v, causal=True, window_size=window)
    else:
        batch, length, heads, dim = q.shape
        cu_seqlens, max_len = layout.memo("cu_seqlens", lambda: _cu_seqlens(layout.doc_ids))
        flat = [t.reshape(batch * length, t.shape[2], dim) for t in (q, k, v)]
        out = flash_attn_varlen_func(
            *flat, cu_seqlens, cu_seqlens, max_len, max_len, causal=True, window_size=window
        ).view(batch, length, heads, dim)
    return out.transpose(1, 2)
