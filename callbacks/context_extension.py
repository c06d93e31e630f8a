"""`ContextExtension`: lengthen the training context (and optionally change RoPE theta) at scheduled steps.

A schedule `{step: seq_len}` or `{step: {seq_len: N, rope_theta: X}}` says which row length the optimizer
step `step` and the following ones train on. Tokens per optimizer step stay constant: rows per batch become
`batch_size * seq_len / new_seq_len`, where `batch_size` and `seq_len` are the datamodule's configured ones.

The switch is `StepSchedule`'s (`callbacks/step_schedule.py`): in `on_train_batch_end` as soon as `global_step`
reaches S, and again in `on_train_start` after a resume. It lands exactly there for the data too because
Lightning asks a sized training loader (PretrainData's stream has a length) for a batch only when it starts that
batch (`_PrefetchDataFetcher` skips its look-ahead when the length is known), and the stream reads its row length
and batch size afresh for every batch. The token stream continues across the switch: nothing is skipped or
repeated. On resume the datamodule starts from its configured length and the model from its configured theta;
the setting of the restored step is applied before the first batch is fetched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

import lightning as L

from moxin_lightning.callbacks.step_schedule import StepSchedule, checked_step, is_int


class Phase(TypedDict):
    """One schedule entry when RoPE theta changes too: `{seq_len: 4096, rope_theta: 500000.0}`."""

    seq_len: int
    rope_theta: NotRequired[float]


@dataclass(frozen=True)
class Setting:
    """What the datamodule and the model use from one step on."""

    seq_len: int
    batch_size: int
    rope_theta: float


def _checked_phase(step: Any, value: Any) -> tuple[int, Phase]:
    """One schedule entry as (step, Phase), or a one-line error saying what is wrong with it."""
    step = checked_step("ContextExtension", step)
    phase: Any = {"seq_len": value} if is_int(value) else value
    if not isinstance(phase, dict) or not is_int(phase.get("seq_len")) or set(phase) - {"seq_len", "rope_theta"}:
        raise ValueError(
            f"ContextExtension schedule entry {step}: {value!r} must be a seq_len or {{seq_len: N, rope_theta: X}}"
        )
    if phase["seq_len"] < 1:
        raise ValueError(f"ContextExtension schedule entry {step}: seq_len={phase['seq_len']} must be >= 1")
    theta = phase.get("rope_theta")
    if theta is not None and (isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 0):
        raise ValueError(f"ContextExtension schedule entry {step}: rope_theta={theta!r} must be a positive number")
    return step, Phase(**phase)


class ContextExtension(StepSchedule[Setting]):
    """Switch the datamodule's row length (and the model's RoPE theta) at scheduled optimizer steps.

    Args:
        schedule: optimizer step -> seq_len, or -> {seq_len: N, rope_theta: X}. Steps before the first
            entry use the datamodule's configured seq_len; an entry without rope_theta keeps the theta in
            force (the model's configured one until an entry sets another).

    Needs a datamodule with `seq_len`, `batch_size` and `set_seq_len(seq_len, batch_size)` (PretrainData),
    and a task with `model_config` (a ModelConfig) and, when a theta is scheduled, `set_rope_theta(theta)`.
    Logs "train/seq_len", the row length each batch was trained on.
    """

    def __init__(self, schedule: dict[int, int | Phase]) -> None:
        if not isinstance(schedule, dict) or not schedule:
            raise ValueError(f"ContextExtension needs a non-empty schedule {{step: seq_len}}, got {schedule!r}")
        super().__init__()
        self.schedule: dict[int, Phase] = dict(sorted(_checked_phase(step, value) for step, value in schedule.items()))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the whole schedule against the data and the model before any training is spent."""
        if stage != "fit":
            return
        data = trainer.datamodule
        if not all(hasattr(data, name) for name in ("seq_len", "batch_size", "set_seq_len")):
            raise TypeError(
                f"ContextExtension needs a datamodule with seq_len, batch_size and set_seq_len (PretrainData); "
                f"got {'no datamodule' if data is None else type(data).__name__}"
            )
        config = getattr(pl_module, "model_config", None)
        if config is None:
            raise TypeError(f"ContextExtension needs a task with `model_config`; {type(pl_module).__name__} has none")
        if any("rope_theta" in phase for phase in self.schedule.values()) and not hasattr(pl_module, "set_rope_theta"):
            name = type(pl_module).__name__
            raise TypeError(f"ContextExtension: the schedule sets rope_theta but {name} has no set_rope_theta")
        tokens = data.batch_size * data.seq_len
        current = Setting(data.seq_len, data.batch_size, config.rope_theta)  # before the first entry
        settings = {0: current}
        for step, phase in self.schedule.items():
            seq_len = phase["seq_len"]
            if seq_len > config.max_seq_len:
                raise ValueError(
                    f"ContextExtension step {step}: seq_len={seq_len} exceeds the model's "
                    f"max_seq_len={config.max_seq_len}; raise max_seq_len or lower the schedule"
                )
            if tokens % seq_len:
                raise ValueError(
                    f"ContextExtension step {step}: seq_len={seq_len} does not divide the {tokens} tokens per batch "
                    f"(batch_size={data.batch_size} x seq_len={data.seq_len}), so the batch size would be "
                    f"{tokens / seq_len:g}; pick a seq_len dividing {tokens} or change batch_size"
                )
            current = Setting(seq_len, tokens // seq_len, float(phase.get("rope_theta", current.rope_theta)))
            settings[step] = current
        self.set_settings(settings)

    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule, setting: Setting) -> None:
        """Make the next batch and forward use `setting` (a no-op when they do)."""
        data = trainer.datamodule
        if (data.seq_len, data.batch_size) != (setting.seq_len, setting.batch_size):
            data.set_seq_len(setting.seq_len, setting.batch_size)
        if pl_module.model_config.rope_theta != setting.rope_theta:
            pl_module.set_rope_theta(setting.rope_theta)

    def log_setting(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("train/seq_len", float(trainer.datamodule.seq_len), on_step=True, on_epoch=False, batch_size=1)
