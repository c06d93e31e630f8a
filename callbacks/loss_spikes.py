"""Loss spikes: a z-score of each optimizer step's loss against the steps before it, logged as a count.

A spike (the loss jumping far above its recent level) often precedes divergence in large runs; OLMo-core
watches for the same thing. Here the loss of optimizer step t is compared with the mean and standard deviation
of the previous `window` finite losses; z > `threshold` counts as a spike: `train/loss_spikes` (the run's total,
kept across a resume) goes up by one and a warning names the step. Only upward jumps count, so a smoothly
falling curve never flags. Steps the task skipped (non-finite loss, see `TrainingTask.max_skipped_steps`)
are not fed to the window.

The loss is read from the task (`last_step_loss`, the global mean over all micro-batches and ranks that
`TrainingTask.on_before_optimizer_step` computes), so every rank sees the same value and flags the same steps.
With GRPO's `epochs_per_batch` > 1 only the last pass of each batch is seen.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn


class LossSpikes(Callback):
    """Counts loss spikes (z-score over a window of previous steps) and logs `train/loss_spikes`.

    Args:
        window: previous optimizer steps the mean and standard deviation come from (also the steps to wait
            before the first check).
        threshold: z-score above which a step's loss is a spike.
        min_std: floor of the standard deviation, so that a nearly flat curve does not turn noise into spikes.
    """

    def __init__(self, window: int = 100, threshold: float = 6.0, min_std: float = 1e-3) -> None:
        if window < 2:
            raise ValueError(f"LossSpikes window={window} must be >= 2 (a standard deviation needs two losses)")
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"LossSpikes threshold={threshold} must be a finite z-score > 0")
        if not (math.isfinite(min_std) and min_std >= 0):
            raise ValueError(f"LossSpikes min_std={min_std} must be a finite number >= 0")
        self.window, self.threshold, self.min_std = window, threshold, min_std
        self.losses: deque[float] = deque(maxlen=window)
        self.spikes = 0
        self.spike_steps: list[int] = []  # optimizer steps (0-based) flagged in this process, for inspection
        self._seen = -1

    def observe(self, step: int, loss: float) -> bool:
        """Add one optimizer step's loss; True when it is a spike against the window before it."""
        spike = False
        if len(self.losses) == self.window:
            mean = sum(self.losses) / self.window
            std = math.sqrt(sum((value - mean) ** 2 for value in self.losses) / (self.window - 1))
            spike = (loss - mean) / max(std, self.min_std) > self.threshold
        if spike:
            self.spikes += 1
            self.spike_steps.append(step)
        self.losses.append(loss)
        return spike

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        seen = getattr(pl_module, "optimizer_steps_seen", None)
        if seen is None or seen == self._seen:  # not a TrainingTask, or an accumulation micro-batch
            return
        self._seen = seen
        loss = pl_module.last_step_loss
        if loss is None or not math.isfinite(loss):
            return
        step = trainer.global_step - 1  # the step that just finished
        if self.observe(step, loss):
            mean = sum(list(self.losses)[:-1]) / (len(self.losses) - 1)
            rank_zero_warn(f"step {step}: loss spike, {loss:.4g} against a mean of {mean:.4g} over {self.window} steps")
        pl_module.log("train/loss_spikes", float(self.spikes), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "spikes": self.spikes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses = deque(state_dict.get("losses", []), maxlen=self.window)
        self.spikes = state_dict.get("spikes", 0)
