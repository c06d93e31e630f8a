"""`StepSchedule`: the switch-at-a-step mechanism of `ContextExtension` and `ResponseLengthCurriculum`.

A schedule maps optimizer steps to settings: the setting of entry S holds from optimizer step S until the next
entry, and steps before the first entry keep what the run was configured with. A subclass turns its schedule into
`(step, setting)` pairs in `setup` (see `set_settings`), says how a setting is put in force (`apply`) and what it
logs for each batch (`log_setting`).

When the switch happens, and why there:
- `trainer.global_step` counts optimizer steps; it becomes S inside the last micro-batch of step S - 1 (with
  manual optimisation, as GRPO does it, at the `optimizer.step()` of that batch).
- `on_train_batch_end` applies the setting of `global_step`, so every micro-batch of step S, and none of step
  S - 1, runs with the new setting, with any `accumulate_grad_batches`; anything that runs between the two
  (an in-loop validation at step S, a checkpoint) sees the setting of step S.
- On resume the run starts from its configured setting, so `on_train_start`, which runs after the checkpoint (and
  `global_step`) is restored and before the first batch, applies the setting of the restored step. The setting is
  a function of the step: a schedule keeps no state of its own in the checkpoint.
"""

from __future__ import annotations

import bisect
from typing import Any, Generic, TypeVar

import lightning as L
from lightning.pytorch.callbacks import Callback

Setting = TypeVar("Setting")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def checked_step(owner: str, step: Any) -> int:
    """A schedule's step, or a one-line error naming the callback that was given it."""
    if not is_int(step) or step < 0:
        raise ValueError(f"{owner} schedule step {step!r} must be an integer >= 0 (an optimizer step)")
    return step


class StepSchedule(Callback, Generic[Setting]):
    """Puts a setting in force at scheduled optimizer steps (see the module docstring). Subclasses call
    `set_settings` in `setup` and implement `apply` and `log_setting`."""

    def __init__(self) -> None:
        self._steps: list[int] = []
        self._settings: list[Setting] = []

    def set_settings(self, settings: dict[int, Setting]) -> None:
        """Step -> the setting from that step on; it must hold step 0 (the configured setting, or an entry at 0)."""
        if 0 not in settings:
            raise ValueError(f"{type(self).__name__}: the settings must start at step 0")
        self._steps = sorted(settings)
        self._settings = [settings[step] for step in self._steps]

    def setting_at(self, step: int) -> Setting:
        """The setting optimizer step `step` runs with (after setup)."""
        return self._settings[bisect.bisect_right(self._steps, step) - 1]

    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule, setting: Setting) -> None:
        """Make the next batch run with `setting` (a no-op when it does)."""
        raise NotImplementedError

    def log_setting(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log what the batch that just ended ran with."""

    def apply_current(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(trainer, pl_module, self.setting_at(trainer.global_step))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply_current(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.log_setting(trainer, pl_module)
        self.apply_current(trainer, pl_module)
