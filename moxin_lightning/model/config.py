"""Model hyperparameters as one dataclass, plus named presets.

The field names are the YAML keys users write under `model.config`. A preset is only a
set of field values: nothing in the code branches on a preset's name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# What every Moxin-family preset shares: the 32K Mistral/Moxin tokenizer, RoPE theta 1e4, RMSNorm eps
# 1e-5, untied embeddings (moxin-org/moxin-llm-7b config.json).
_MOXIN_FAMILY: dict[str, Any] = dict(vocab_size=32000, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=False)
_MOXIN_7B: dict[str, Any] = dict(
    _MOXIN_FAMILY, dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
    sliding_window=4096, max_seq_len=32768,
)  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    "moxin-7b": _MOXIN_7B,
    # Mistral-7B-v0.1: the same block, 32 of them.
    "mistral-7b": dict(_MOXIN_7B, n_layers=32),
    # Tiny Moxin-shaped models (GQA, SwiGLU, a sliding window) that train on a laptop CPU. They keep the
    # 32K vocabulary so they use the real tokenizer; most of their weights are embeddings.
    "moxin-tiny-9m": dict(
        _MOXIN_FAMILY, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=384,
        sliding_window=256, max_seq_len=2048,
    ),
    "moxin-tiny-23m": dict(
        _MOXIN_FAMILY, dim=256, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=32, ffn_dim=768,
        sliding_window=512, max_seq_len=4096,
    ),
    "moxin-small-124m": dict(
        _MOXIN_FAMILY, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, head_dim=64, ffn_dim=2048,
        sliding_window=1024, max_seq_len=8192,
    ),
}  # fmt: skip


@dataclass
class ModelConfig:
    """Architecture of a Mistral-style decoder (pre-RMSNorm, GQA, RoPE, SwiGLU, sliding window).

    `sliding_window` follows Hugging Face's convention: a query attends to at most
    `sliding_window` keys, itself included. `None` means full causal attention.
    """

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 36
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096
    max_seq_len: int = 32768
    tie_embeddings: bool = False
    attention: str = "sdpa"  # a kernel name registered in moxin_lightning.model.attention
    init_std: float = 0.02  # Moxin/Mistral initializer_range
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim explicitly")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1, or null for full attention")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A preset by name, with any field overridden (e.g. `attention="flex"`)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
        check_fields(overrides, "model_overrides")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def cache_slots(self) -> int:
        """Key/value slots one sequence needs at most: the window, or the whole context without one."""
        return min(self.sliding_window or self.max_seq_len, self.max_seq_len)

    def num_params(self) -> int:
        """Parameter count computed from the fields alone (no model is built)."""
        attn = self.dim * self.n_heads * self.head_dim * 2 + self.dim * self.kv_dim * 2
        block = attn + 3 * self.dim * self.ffn_dim + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.n_layers * block + self.vocab_size * self.dim + head + self.dim

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward = 3x forward), for MFU.

        Counts every matmul (6 * non-embedding params, lm head included) plus attention scores and
        values over the keys a query can see (PaLM's 12*L*H*d*T with T capped at the window).
        """
        matmul_params = self.num_params() - self.vocab_size * self.dim - self.dim * (2 * self.n_layers + 1)
        if self.tie_embeddings:
            matmul_params += self.vocab_size * self.dim
        keys_seen = min(seq_len, self.sliding_window or seq_len)
        attn = 12 * self.n_layers * self.n_heads * self.head_dim * keys_seen
        return 6 * matmul_params + attn

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def check_fields(values: dict[str, Any], where: str) -> None:
    """A misspelled field (`n_layer`) is a one-line error naming it, the closest field and the valid ones,
    instead of the dataclass's TypeError (which LightningCLI reports as "Does not validate ...")."""
    import difflib

    valid = ModelConfig.field_names()
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{where}: unknown key {key!r}; {hint}valid keys: {', '.join(valid)}")
