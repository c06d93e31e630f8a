"""Single-device model code: no Lightning, no distributed."""

from moxin_lightning.model.attention import AttentionLayout, available_kernels, get_kernel, register_kernel
from moxin_lightning.model.cache import RollingKVCache
from moxin_lightning.model.config import PRESETS, ModelConfig
from moxin_lightning.model.transformer import Transformer

__all__ = [
    "PRESETS",
    "AttentionLayout",
    "ModelConfig",
    "RollingKVCache",
    "Transformer",
    "available_kernels",
    "get_kernel",
    "register_kernel",
]
