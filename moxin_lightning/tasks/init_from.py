"""Read the starting weights of a run (`init_from`): a Lightning checkpoint, a Hugging Face folder or a release.

A release folder (written by `moxin_lightning.callbacks.CheckpointPromotion`) is a Hugging Face folder with more files
beside the weights, so both go through `moxin_lightning.hf`. A Lightning checkpoint is a `.ckpt` file, or
the folder a sharded (FSDP2) run saves, read with `torch.distributed.checkpoint` into the full state.
Everything is loaded tensors-only (`weights_only=True`, safetensors).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moxin_lightning.checkpoint import check_state, read_training_checkpoint
from moxin_lightning.hf import CheckpointError, config_from_hf, import_hf
from moxin_lightning.model.config import ModelConfig

# fields that decide the shape of the weights; the others (window, theta, kernel, max length) may change
_SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "tie_embeddings")


def read_initial_state(path: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Full state dict (our parameter names, CPU) of `path`, checked to fit a model built from `config`."""
    source = Path(path)
    if not source.exists():
        raise CheckpointError(
            f"init_from {source} does not exist; point it at a release folder, a Hugging Face folder or a .ckpt file"
        )
    if (source / "config.json").is_file():
        _check_shapes(config_from_hf(json.loads((source / "config.json").read_text())), config, source)
        return import_hf(source).state_dict()
    state, _ = read_training_checkpoint(source)
    check_state(state, config, source, "set the task's preset/model overrides to match the checkpoint")
    return state


def _check_shapes(found: ModelConfig, config: ModelConfig, where: Path) -> None:
    differences = [
        f"{field} {getattr(found, field)} (configured {getattr(config, field)})"
        for field in _SHAPE_FIELDS
        if getattr(found, field) != getattr(config, field)
    ]
    if differences:
        raise CheckpointError(
            f"init_from {where} is a different model: {', '.join(differences)}; set the task's preset/model "
            "overrides to match it"
        )
