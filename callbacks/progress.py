"""A progress bar over optimizer steps, with loss, tokens/s, MFU and the time left to `max_steps`.

Lightning's bar counts micro-batches of the current epoch and starts over at each epoch; a pretraining run is
bounded by `max_steps` instead, often within a single pass over a stream, and resumes mid-run. This bar counts
optimizer steps from the step a run resumed at up to `max_steps`, so tqdm's rate is measured on the steps done
in this session and the ETA covers exactly the steps left. Without `max_steps` it is Lightning's bar.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar

# (logged name, label on the bar, format): the few figures worth watching, shown first and short.
_SHOWN = (
    ("train/loss", "loss", "{:.4f}"),
    ("train/tokens_per_s", "tok/s", "{:,.0f}"),
    ("train/mfu", "mfu", "{:.1%}"),
)


class StepProgressBar(TQDMProgressBar):
    """TQDMProgressBar counting optimizer steps up to `max_steps` across epochs and resumes."""

    def _counts_steps(self, trainer: pl.Trainer) -> bool:
        return trainer.max_steps > 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not self._counts_steps(trainer):
            return
        bar = self.train_progress_bar
        bar.unit = "step"
        bar.reset(total=trainer.max_steps)  # also restarts tqdm's clock: the rate covers this session only
        bar.initial = bar.n = bar.last_print_n = trainer.global_step
        bar.set_description("Training")

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self._counts_steps(trainer):
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._counts_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, step = self.train_progress_bar, trainer.global_step
        if step != bar.n and self._should_update(step, bar.total) and not bar.disable:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._counts_steps(trainer):
            return super().on_train_epoch_end(trainer, pl_module)
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Loss, tokens/s and MFU first under short labels (whether or not logged with prog_bar), then the rest."""
        items = super().get_metrics(trainer, pl_module)
        shown = {}
        for name, label, style in _SHOWN:
            if name in trainer.callback_metrics:
                shown[label] = style.format(float(trainer.callback_metrics[name]))
                items.pop(name, None)
        return {**shown, **items}
