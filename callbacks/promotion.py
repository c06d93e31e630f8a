"""`CheckpointPromotion`: turn the end of a training phase into a release folder the next phase starts from.

Usage in a phase's YAML:

    trainer:
      callbacks:
        - class_path: moxin_lightning.callbacks.promotion.CheckpointPromotion
          init_args: {dirpath: releases/phase1, on_best_val: true}

and in the next phase `init_from: releases/phase1`. The folder is a Hugging Face model folder plus the run's
config, data manifests, metrics, the curves of the task's panels (`loss.png`, and e.g. DPO's reward accuracy),
code version, Model Openness Framework manifest and model card (see `moxin_lightning.release`).
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from moxin_lightning.hf import DEFAULT_MAX_SHARD_BYTES
from moxin_lightning.release import (
    DTYPES,
    LossCurves,
    Panel,
    Release,
    WeightDtype,
    check_destination,
    default_panels,
    model_from_state_dict,
    write_release,
)
from moxin_lightning.release.plots import check_panels, check_smoothing


class CheckpointPromotion(Callback):
    """Write a release folder when a phase ends, and optionally whenever the validation loss improves.

    The phase has ended when `fit` finishes on its own: at `max_steps` (or, without `max_steps`, at
    `max_epochs`). A run that was interrupted, failed, or stopped early (e.g. by a time limit, to be resumed)
    writes no release. The folder is built beside `dirpath` and renamed into place, so a crash leaves the
    previous release as it was.

    The callback records the curves itself and keeps them in its checkpoint state, so the plots of a resumed run
    show the whole phase: the metrics of the task's `release_panels` (default: `train_metric` and `monitor`, in
    `loss.png`), `val/...` ones and `monitor` at every validation, the others after every optimizer step. A fresh
    phase's first validation point is step 0, the starting weights: `validate_at_start` makes Lightning's sanity
    check (run before the first step unless `num_sanity_val_steps: 0`) a whole validation pass, and records it.

    Args:
        dirpath: the release folder, e.g. `releases/phase1`; the next phase's `init_from`.
        on_best_val: also write a release to `best_dirpath` each time `monitor` reaches a new minimum.
        best_dirpath: where the best-validation release goes (default: `<dirpath>-best`); always replaced.
        monitor: the validation metric to plot and to minimise.
        train_metric: the training loss to plot.
        validate_at_start: validate on the whole validation set before the first step of a fresh phase (the
            sanity check, widened) and record it as step 0. Its cost is one more validation pass.
        smoothing: beta of the debiased exponential moving average drawn over each per-step metric (0: none).
        overwrite: replace an existing release at `dirpath` (refused at the start of `fit` otherwise). A folder
            that is not a release is never replaced.
        name, description: the model card's title (default: the folder's name) and opening paragraph.
        dtype: store the weights as float32, bfloat16 or float16 (default: as the task returns them).
        max_shard_bytes: largest safetensors file; bigger models are sharded.
        include_code: copy the source of moxin_lightning, callbacks and datamodules into the release.
        sample_prompts: prompts whose greedy continuations (`sample_tokens` tokens) go into samples.json;
            needs the datamodule's tokenizer.
        technical_report: a file copied into the release as its technical report.
    """

    def __init__(
        self,
        dirpath: str,
        on_best_val: bool = False,
        best_dirpath: str | None = None,
        monitor: str = "val/loss",
        train_metric: str = "train/loss",
        validate_at_start: bool = True,
        smoothing: float = 0.9,
        overwrite: bool = True,
        name: str | None = None,
        description: str = "",
        dtype: WeightDtype | None = None,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        include_code: bool = True,
        sample_prompts: list[str] | None = None,
        sample_tokens: int = 32,
        technical_report: str | None = None,
    ) -> None:
        super().__init__()
        if not dirpath:
            raise ValueError("CheckpointPromotion needs dirpath, the release folder (e.g. releases/phase1)")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"CheckpointPromotion dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        if sample_tokens < 1:
            raise ValueError(f"CheckpointPromotion sample_tokens={sample_tokens} must be >= 1")
        if technical_report is not None and not Path(technical_report).is_file():
            raise ValueError(f"CheckpointPromotion technical_report {technical_report} is not a file")
        check_smoothing(smoothing)
        self.dirpath = Path(dirpath)
        self.on_best_val = on_best_val
        self.best_dirpath = Path(best_dirpath) if best_dirpath else self.dirpath.with_name(self.dirpath.name + "-best")
        if self.best_dirpath.resolve() == self.dirpath.resolve():
            raise ValueError(f"best_dirpath {best_dirpath} is dirpath itself; choose another folder")
        self.monitor = monitor
        self.train_metric = train_metric
        self.validate_at_start = validate_at_start
        self.smoothing = smoothing
        self.overwrite = overwrite
        self.name = name or self.dirpath.name
        self.description = description
        self.dtype = dtype
        self.max_shard_bytes = max_shard_bytes
        self.include_code = include_code
        self.sample_prompts = list(sample_prompts or [])
        self.sample_tokens = sample_tokens
        self.technical_report = technical_report
        self.curves = LossCurves(train_metric=train_metric, monitor=monitor)
        self.panels: list[Panel] = default_panels(self.curves)
        self.best: float | None = None
        self._failed = False
        self._at_start = False  # the sanity check running now is the whole validation of the starting weights
        self._sanity_steps: int | None = None  # the trainer's setting, while this callback widened the check

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=str(self.dirpath))

    # -- checks before any work ---------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        for attribute in ("model_config", "full_state_dict"):
            if inspect.getattr_static(pl_module, attribute, None) is None:
                raise ValueError(
                    f"CheckpointPromotion needs a task with `model_config` and `full_state_dict()`; "
                    f"{type(pl_module).__name__} has no `{attribute}` (use a moxin_lightning task)"
                )
        check_destination(self.dirpath, self.overwrite)
        if self.on_best_val:
            check_destination(self.best_dirpath, overwrite=True)
        if self.sample_prompts and _tokenizer(trainer) is None:
            raise ValueError("CheckpointPromotion sample_prompts need the datamodule's tokenizer; it has none")
        self.panels = list(getattr(pl_module, "release_panels", None) or default_panels(self.curves))
        check_panels(self.panels)
        self._failed = False

    # -- curves -------------------------------------------------------------------------------------------

    def _metrics(self, per_step: bool) -> list[str]:
        """The metrics recorded after every optimizer step (per_step) or at every validation, each once."""
        named = [self.train_metric, self.monitor] + [m for panel in self.panels for m in panel.metrics]
        return [m for m in dict.fromkeys(named) if self.curves.is_per_step(m) == per_step]

    def _record(self, trainer: L.Trainer, metrics: list[str]) -> None:
        for metric in metrics:
            value = _number(trainer.callback_metrics.get(metric))
            if value is not None:
                self.curves.add(metric, trainer.global_step, value)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step, metrics = trainer.global_step, self._metrics(per_step=True)
        last = max((points[-1][0] for points in map(self.curves.points, metrics) if points), default=0)
        if step == 0 or last >= step:
            return  # no optimizer step since the last point (gradient accumulation)
        self._record(trainer, metrics)

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Before a fresh phase's first step, make the sanity check a whole validation pass: the step-0 point.

        Lightning reads `num_sanity_val_steps` when the check's loop starts, right after this hook; a resumed run
        (step > 0) keeps its setting and records nothing here."""
        if not (self.validate_at_start and trainer.global_step == 0 and trainer.state.fn == TrainerFn.FITTING):
            return
        self._at_start = True
        if math.isfinite(trainer.num_sanity_val_steps):  # already whole (-1, or widened by another callback)
            self._sanity_steps = trainer.num_sanity_val_steps
            trainer.num_sanity_val_steps = float("inf")

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Give the trainer its setting back (only what this callback changed)."""
        if self._sanity_steps is not None:
            trainer.num_sanity_val_steps, self._sanity_steps = self._sanity_steps, None
        self._at_start = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.sanity_checking:  # the starting weights, when the check was widened to the whole set
            if self._at_start:
                self._record(trainer, self._metrics(per_step=False))
            return  # not a release: the untrained model is not the best of the phase
        self._record(trainer, self._metrics(per_step=False))
        value = _number(trainer.callback_metrics.get(self.monitor))
        if value is None or not self.on_best_val:
            return
        # Rank 0 decides, so every rank takes part in the collective `full_state_dict` or none does.
        improved = trainer.strategy.broadcast(self.best is None or value < self.best, src=0)
        if improved:
            self.best = trainer.strategy.broadcast(value, src=0)
            self._promote(trainer, pl_module, self.best_dirpath, overwrite=True)

    # -- end of the phase ---------------------------------------------------------------------------------

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or self._failed:
            return
        if trainer.max_steps > 0 and trainer.global_step < trainer.max_steps:
            rank_zero_warn(
                f"CheckpointPromotion: training stopped at step {trainer.global_step} before max_steps="
                f"{trainer.max_steps}; no release written to {self.dirpath} (resume the run to finish the phase)"
            )
            return
        self._promote(trainer, pl_module, self.dirpath, overwrite=self.overwrite)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._failed = True

    def _promote(self, trainer: L.Trainer, pl_module: L.LightningModule, folder: Path, overwrite: bool) -> None:
        """Gather the weights on every rank (a collective), write on rank 0, then let every rank go on."""
        state = pl_module.full_state_dict()
        if trainer.is_global_zero:
            state = {name: tensor.detach().cpu() for name, tensor in state.items()}
            model = model_from_state_dict(pl_module.model_config, state)
            write_release(
                folder,
                model,
                self._release(trainer, pl_module),
                overwrite=overwrite,
                max_shard_bytes=self.max_shard_bytes,
                dtype=self.dtype,
            )
            rank_zero_info(f"CheckpointPromotion: wrote release {folder} at step {trainer.global_step}")
        trainer.strategy.barrier("CheckpointPromotion")

    def _release(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Release:
        datamodule = trainer.datamodule
        metrics = {name: _number(value) for name, value in trainer.callback_metrics.items() if _is_scalar(value)}
        return Release(
            name=self.name,
            description=self.description,
            tokenizer=_tokenizer(trainer),
            run_config=getattr(trainer, "resolved_config", None) or _hyperparameters(pl_module, datamodule),
            data_manifests=_manifests(datamodule),
            metrics=metrics,
            training=_training_facts(trainer, datamodule, metrics),
            curves=LossCurves.from_dict(self.curves.to_dict()),
            panels=list(self.panels),
            smoothing=self.smoothing,
            sample_prompts=self.sample_prompts,
            sample_tokens=self.sample_tokens,
            include_code=self.include_code,
            technical_report=self.technical_report,
        )

    # -- checkpoint state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"curves": self.curves.to_dict(), "best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The checkpoint's points, under this run's metric names (a checkpoint from before the series has none)."""
        curves = LossCurves.from_dict(state_dict.get("curves", {}))
        curves.train_metric, curves.monitor = self.train_metric, self.monitor
        self.curves = curves
        self.best = state_dict.get("best")


def _tokenizer(trainer: L.Trainer) -> Any:
    return getattr(trainer.datamodule, "tokenizer", None)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)


def _number(value: Any) -> float | None:
    """A logged scalar as a float; None when absent, not a scalar, or not finite."""
    if value is None or not _is_scalar(value):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _hyperparameters(pl_module: L.LightningModule, datamodule: Any) -> dict[str, Any] | None:
    """The saved hyperparameters, when no resolved config text is on the trainer (a run outside the CLI)."""
    config = {"model": dict(pl_module.hparams)} if pl_module.hparams else {}
    if datamodule is not None and getattr(datamodule, "hparams", None):
        config["data"] = dict(datamodule.hparams)
    return config or None


def _manifests(datamodule: Any) -> dict[str, dict[str, Any]]:
    """data/ folder name -> manifest: `<index>-<dataset folder name>` (so two folders called the same still
    differ), in letters, digits, `.`, `_` and `-` only (cached datasets are named like `builtin:local-<hash>`)."""
    manifests = list(getattr(datamodule, "manifests", None) or [])
    folders = list(getattr(datamodule, "datasets", None) or [])
    if len(folders) != len(manifests):
        folders = [""] * len(manifests)
    names = [re.sub(r"[^A-Za-z0-9._-]", "_", Path(folder).name) for folder in folders]
    return {
        f"{index}-{name}" if name else str(index): manifest
        for index, (name, manifest) in enumerate(zip(names, manifests, strict=True))
    }


def _training_facts(trainer: L.Trainer, datamodule: Any, metrics: dict[str, float | None]) -> dict[str, Any]:
    tokens = metrics.get("train/tokens_seen")
    facts = {
        "global_step": trainer.global_step,
        "max_steps": trainer.max_steps if trainer.max_steps > 0 else None,
        "tokens_seen": int(tokens) if tokens is not None and float(tokens).is_integer() else tokens,
        "seq_len": getattr(datamodule, "seq_len", None),
        "batch_size": getattr(datamodule, "batch_size", None),
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "devices": trainer.world_size,
        "precision": trainer.precision,
    }
    return {name: value for name, value in facts.items() if value is not None}
