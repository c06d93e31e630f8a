"""Rotary position embedding, in the half-split layout Hugging Face Mistral checkpoints use.

Nothing is stored in buffers: the tables are computed from the positions of each forward,
so a model built on the meta device needs no re-initialisation, packed documents and
rolling-cache decoding just pass their own positions, and a context-extension phase changes
`rope_theta` without touching the weights.
"""

from __future__ import annotations

import torch


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos and sin of shape (B, 1, T, head_dim) for integer `positions` of shape (B, T)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.float().unsqueeze(-1) * inv_freq  # (B, T, head_dim/2), fp32 like HF
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, head_dim) queries or keys; the two halves of head_dim form the complex pairs."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)
    return x * cos + rotated_half * sin


def positions_from_documents(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever `doc_ids` (B, T) changes value along a row."""
    batch, length = doc_ids.shape
    index = torch.arange(length, device=doc_ids.device).expand(batch, length)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_of_current_doc = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_of_current_doc
