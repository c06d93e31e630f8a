"""Shared fixtures: tiny deterministic models on CPU, and the gpu/distributed marker policy."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from moxin_lightning.model import ModelConfig, Transformer  # noqa: E402
from moxin_lightning.model.transformer import same_weights  # noqa: E402, F401  (re-exported for tests)


def tiny_config(**overrides) -> ModelConfig:
    """A model small enough for milliseconds per forward, with GQA and a window shorter than test sequences."""
    fields = dict(
        vocab_size=101, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=80, sliding_window=8, max_seq_len=512
    )
    return ModelConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(**overrides)).eval()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
