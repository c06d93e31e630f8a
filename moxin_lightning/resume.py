"""What a resumed run (`fit --ckpt_path`) takes from its config and what it refuses to change.

Lightning restores the optimizer's param groups and the schedule's base learning rates from the checkpoint,
i.e. the settings of the run that wrote it, and LightningCLI would even replace the config's `model:` settings
with the checkpoint's (`MoxinCLI` turns that off): a new learning rate or model size on the command line was
silently dropped. Here the rule is explicit:

- may change: the optimizer's settings (lr, betas, eps, weight decay), the schedule (kind, warmup, min ratio,
  and its length through trainer.max_steps), and everything of the Trainer (max_steps, val interval, callbacks,
  logging); `ApplyResumeSettings` puts the config's optimizer and schedule settings back after the restore
  (the AdamW moments and the step count are the checkpoint's). With unchanged settings nothing moves, so an
  exact resume stays bit-identical.
- refused, one line naming the setting, the checkpoint's value and the config's: the model's shape (preset,
  model_overrides; all ModelConfig fields but the attention kernel, RoPE's theta, which ContextExtension sets
  per step, and init_std, which only draws initial weights) and the tokenizer. The data itself is checked by
  the datamodule (PretrainData's fingerprint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from moxin_lightning.checkpoint import MODEL_CONFIG_KEY, TOKENIZER_KEY

CHANGEABLE_MODEL_FIELDS = frozenset({"attention", "rope_theta", "init_std"})


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint's non-tensor entries without reading its tensors: a file is memory-mapped, a sharded
    folder's are in meta.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / "meta.pt"
        if not path.is_file():
            return {}
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - truncated or foreign file: name it in one line (checkpoint_io)
        from moxin_lightning.checkpoint_io import CheckpointReadError, unreadable_checkpoint

        raise CheckpointReadError(unreadable_checkpoint(path, error)) from error


def check_resumable(path: str | Path, model_config: dict[str, Any], tokenizer_fingerprint: str | None) -> None:
    """Refuse a resume whose config asks for another model or tokenizer than the checkpoint holds."""
    saved = checkpoint_metadata(path)
    reason = "a resumed run keeps its model; start a new run with init_from to change it"
    for field, old in (saved.get(MODEL_CONFIG_KEY) or {}).items():
        new = model_config.get(field)
        if field not in CHANGEABLE_MODEL_FIELDS and new != old:
            raise ValueError(
                f"--ckpt_path {path} holds a model with {field}={old}; the config gives {field}={new} ({reason})"
            )
    old_tokenizer = (saved.get(TOKENIZER_KEY) or {}).get("fingerprint")
    if old_tokenizer and tokenizer_fingerprint and old_tokenizer != tokenizer_fingerprint:
        raise ValueError(
            f"--ckpt_path {path} was trained with tokenizer {old_tokenizer[:12]}; the data's tokenizer is "
            f"{tokenizer_fingerprint[:12]} (a resumed run keeps its tokenizer)"
        )


class ApplyResumeSettings(L.Callback):
    """Checks a resume before the model is loaded; after the restore, applies the config's optimizer and schedule."""

    def __init__(self, ckpt_path: str | None) -> None:
        self.ckpt_path = ckpt_path  # as given: the Trainer resolves it only after setup, when the model is loaded

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.ckpt_path or not hasattr(pl_module, "model_config"):
            return
        path = self.ckpt_path
        if path in ("last", "hpc", "registry"):  # Lightning's names, resolved as fit will resolve them
            path = trainer._checkpoint_connector._select_ckpt_path(
                trainer.state.fn, path, model_provided=True, model_connected=True
            )
            if path is None:  # `last` with no checkpoint yet: a fresh start
                return
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        check_resumable(path, pl_module.model_config.to_dict(), getattr(tokenizer, "fingerprint", None))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.ckpt_path or len(trainer.optimizers) != 1:
            return
        fresh = pl_module.configure_optimizers()  # the config's optimizer and schedule, without state
        if not isinstance(fresh, dict) or not isinstance(fresh.get("lr_scheduler"), dict):
            return
        restored, new = trainer.optimizers[0], fresh["optimizer"]
        for group, new_group in zip(restored.param_groups, new.param_groups, strict=True):
            group.update({key: value for key, value in new_group.items() if key != "params"})
        new_scheduler = fresh["lr_scheduler"]["scheduler"]
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not hasattr(scheduler, "lr_lambdas"):
                continue
            scheduler.base_lrs = list(new_scheduler.base_lrs)
            scheduler.lr_lambdas = new_scheduler.lr_lambdas  # the config's schedule and run length
            for group, base, factor in zip(
                restored.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
            ):
                group["lr"] = base * factor(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in restored.param_groups]
