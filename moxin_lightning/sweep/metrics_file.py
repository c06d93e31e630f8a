"""`MetricsFile`: the run's metrics as JSON lines, for a process watching the run (the offline sweep).

A sweep trial is a separate process; this file is how the sweep learns the trial's metric while it runs
(to prune it) and after it ends (its objective: the last value logged, as W&B's run summary keeps). One line
per validation and one at the end of fit:

    {"step": 100, "event": "validation", "metrics": {"val/loss": 5.91, "train/loss": 5.87, ...}}

Lines are appended and flushed one at a time, so a reader sees whole records up to the last newline. Only
global rank 0 writes. `MoxinCLI` adds this callback when the environment variable MOXIN_METRICS_FILE is set.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch


class MetricsFile(L.Callback):
    """Append `trainer.callback_metrics` (scalars, as floats) to `path` after each validation and at fit end."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._append(trainer, "validation")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._append(trainer, "fit_end")

    def _append(self, trainer: L.Trainer, event: str) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {}
        for name, value in trainer.callback_metrics.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    continue
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[name] = float(value) if math.isfinite(value) else str(float(value))
        record = {"step": trainer.global_step, "event": event, "metrics": metrics}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
            stream.flush()
