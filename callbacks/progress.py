"""A progress bar over optimizer steps, with loss, tokens/s, MFU, the time left and each task's own figures.

Lightning's bar counts micro-batches of the current epoch and starts over at each epoch; a run is bounded by
`max_steps` (pretraining, the local overlays), or by `max_epochs` (SFT, DPO, GRPO), and resumes mid-run. This
bar counts optimizer steps from the step a run resumed at up to the last one (`trainer.estimated_stepping_batches`:
`max_steps`, or the steps of `max_epochs` over the training data), so tqdm's rate is measured on the steps done
in this session and the ETA covers exactly the steps left. Without a finite count (an endless stream and no
`max_steps`) it is Lightning's bar.

Every stage shows the same fields first, then whichever figures of its task are logged: DPO's reward accuracy
and margin, GRPO's mean reward and rollout generation speed. The bar reads them from the logged metrics by name,
so a task needs no code here, only to log them.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar

# (logged name, label on the bar, format): the few figures worth watching, in this order, each shown once logged.
SHOWN = (
    ("train/loss", "loss", "{:.4f}"),
    ("train/tokens_per_s", "tok/s", "{:,.0f}"),
    ("train/mfu", "mfu", "{:.1%}"),
    ("train/rewards_accuracy", "acc", "{:.0%}"),  # DPO: pairs of the step whose chosen response wins
    ("train/rewards_margin", "margin", "{:.3f}"),  # DPO: chosen minus rejected implicit reward
    ("train/reward_mean", "reward", "{:.3f}"),  # GRPO: mean reward of the step's rollouts
    ("train/generation_tokens_per_s", "gen tok/s", "{:,.0f}"),  # GRPO: completion tokens per second of sampling
    ("val/reward_mean", "val reward", "{:.3f}"),  # GRPO: mean reward on the held-out prompts
)


class StepProgressBar(TQDMProgressBar):
    """TQDMProgressBar counting optimizer steps to the run's last step across epochs and resumes."""

    _total: int | None = None  # the step the bar counts to, set at train start; None: Lightning's bar

    def _total_steps(self, trainer: pl.Trainer) -> int | None:
        """The optimizer step the run ends at, or None when it has no finite end to count to."""
        total = trainer.estimated_stepping_batches
        return int(total) if math.isfinite(total) and total > 0 else None

    def _counts_steps(self) -> bool:
        return self._total is not None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._total = self._total_steps(trainer)
        if not self._counts_steps():
            return
        bar = self.train_progress_bar
        bar.unit = "step"
        bar.reset(total=self._total)  # also restarts tqdm's clock: the rate covers this session only
        bar.initial = bar.n = bar.last_print_n = trainer.global_step
        bar.set_description("Training")

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self._counts_steps():
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._counts_steps():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, step = self.train_progress_bar, trainer.global_step
        if step != bar.n and self._should_update(step, bar.total) and not bar.disable:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._counts_steps():
            return super().on_train_epoch_end(trainer, pl_module)
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The `SHOWN` figures that are logged first, under short labels (whether or not logged with prog_bar),
        then the rest of Lightning's items."""
        items = super().get_metrics(trainer, pl_module)
        return {**shown_metrics(trainer.callback_metrics), **{k: v for k, v in items.items() if k not in _NAMES}}


_NAMES = {name for name, _, _ in SHOWN}


def shown_metrics(metrics: dict[str, Any]) -> dict[str, str]:
    """The `SHOWN` figures among `metrics` (logged name -> value), formatted and under their labels."""
    return {label: style.format(float(metrics[name])) for name, label, style in SHOWN if name in metrics}
