"""`ResponseLengthCurriculum`: lengthen GRPO's responses, and grow its groups, at scheduled optimizer steps.

DeepScaleR's iterative context lengthening (agentica-project/deepscaler, scripts/train/run_deepscaler_1.5b_8k.sh,
_16k.sh and _24k.sh, and the switch points its README reports): responses of at most 8K tokens with 8 completions
per prompt first, then 16K with 16 from step 1040, then 24K from step 1520:

    - class_path: moxin_lightning.callbacks.ResponseLengthCurriculum
      init_args:
        schedule:
          1040: {max_response_length: 16384, group_size: 16}
          1520: {max_response_length: 24576}

The task's configured `max_response_length` and `group_size` hold before the first entry; an entry that leaves
one out keeps the one in force. GRPO reads both afresh for every batch of rollouts, so the switch is
`StepSchedule`'s: every rollout of optimizer step S, and none of step S - 1, uses the new values, and a run
resumed from any checkpoint (before, at or after a switch) uses the values of its restored step. Steps are
optimizer steps: a batch of rollouts is one step with `epochs_per_batch: 1` (DeepScaleR's and Moxin's
`ppo_epochs`), `epochs_per_batch` steps otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from moxin_lightning.callbacks.step_schedule import StepSchedule, checked_step, is_int

KEYS = ("max_response_length", "group_size")


class Stage(TypedDict, total=False):
    """One schedule entry: `{max_response_length: 16384, group_size: 16}`, either key alone, or both."""

    max_response_length: int
    group_size: int


@dataclass(frozen=True)
class Rollouts:
    """What GRPO's rollouts use from one step on."""

    max_response_length: int
    group_size: int


def _checked_stage(step: Any, value: Any) -> tuple[int, Stage]:
    """One schedule entry as (step, Stage), or a one-line error naming what is wrong and the fix."""
    step = checked_step("ResponseLengthCurriculum", step)
    where = f"ResponseLengthCurriculum schedule entry {step}"
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{where}: {value!r} must be {{max_response_length: N, group_size: G}} (either or both)")
    unknown = [key for key in value if key not in KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; use max_response_length and/or group_size")
    for key, least in (("max_response_length", 1), ("group_size", 2)):
        if key in value and (not is_int(value[key]) or value[key] < least):
            why = " (group-relative advantages need 2 completions)" if key == "group_size" else ""
            raise ValueError(f"{where}: {key}={value[key]!r} must be an integer >= {least}{why}")
    return step, Stage(**value)


class ResponseLengthCurriculum(StepSchedule[Rollouts]):
    """Set GRPO's `max_response_length` and `group_size` at scheduled optimizer steps (see the module docstring).

    Args:
        schedule: optimizer step -> {max_response_length: N, group_size: G}, either or both.

    Needs a task with `max_response_length` and `group_size` attributes that it reads every step (GRPO). Before
    training it checks each scheduled length against the model: the longest prompt (the datamodule's
    `max_prompt_length`, where it has one) plus the response must fit `max_seq_len`. Logs
    "train/max_response_length" and "train/group_size", the values each step's rollouts used.
    """

    def __init__(self, schedule: dict[int, Stage]) -> None:
        if not isinstance(schedule, dict) or not schedule:
            raise ValueError(
                "ResponseLengthCurriculum needs a non-empty schedule {step: {max_response_length: N, group_size: G}}"
                f", got {schedule!r}"
            )
        super().__init__()
        self.schedule: dict[int, Stage] = dict(sorted(_checked_stage(step, value) for step, value in schedule.items()))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the schedule against the task, the data and the model before any training is spent."""
        if stage != "fit":
            return
        missing = [key for key in KEYS if not is_int(getattr(pl_module, key, None))]
        if missing:
            raise TypeError(
                f"ResponseLengthCurriculum needs a task with integer max_response_length and group_size (GRPO); "
                f"{type(pl_module).__name__} has no {missing[0]}"
            )
        config = getattr(pl_module, "model_config", None)
        prompt = getattr(trainer.datamodule, "max_prompt_length", None) or 0
        current = Rollouts(pl_module.max_response_length, pl_module.group_size)  # configured: before the first entry
        settings = {0: current}
        for step, entry in self.schedule.items():
            current = Rollouts(**{key: entry.get(key, getattr(current, key)) for key in KEYS})
            if config is not None and prompt + current.max_response_length > config.max_seq_len:
                raise ValueError(
                    f"ResponseLengthCurriculum step {step}: max_response_length={current.max_response_length} plus "
                    f"max_prompt_length={prompt} exceeds the model's max_seq_len={config.max_seq_len}; raise "
                    "model.init_args.model_overrides.max_seq_len or lower the schedule"
                )
            settings[step] = current
        self.set_settings(settings)

    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule, setting: Rollouts) -> None:
        pl_module.max_response_length = setting.max_response_length
        pl_module.group_size = setting.group_size

    def log_setting(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for key in KEYS:
            pl_module.log(f"train/{key}", float(getattr(pl_module, key)), on_step=True, on_epoch=False, batch_size=1)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Validation inside `fit` (the sanity check of a resumed run included) samples with the step's values."""
        if trainer.state.fn == TrainerFn.FITTING and self._steps:
            self.apply_current(trainer, pl_module)
