"""`ContextExtension`: lengthen the training context (and optionally change RoPE theta) at scheduled steps.

A schedule `{step: seq_len}` or `{step: {seq_len: N, rope_theta: X}}` says which row length the optimizer
step `step` and the following ones train on. Tokens per optimizer step stay constant: rows per batch become
`batch_size * seq_len / new_seq_len`, where `batch_size` and `seq_len` are the datamodule's configured ones.

When the switch happens, and why there:
- Lightning asks a sized training loader (PretrainData's stream has a length) for a batch only when it starts
  that batch: `_PrefetchDataFetcher` skips its look-ahead when the length is known. And the stream reads its
  row length and batch size afresh for every batch.
- `trainer.global_step` counts optimizer steps; it becomes S inside the last micro-batch of step S - 1.
So switching in `on_train_batch_end` as soon as `global_step` reaches S makes every micro-batch of step S, and
none of step S - 1, use the new setting, with any `accumulate_grad_batches`. The token stream continues
across the switch: nothing is skipped or repeated.

On resume the datamodule starts from its configured length and the model from its configured theta, so
`on_train_start`, which runs after the checkpoint (and `global_step`) is restored and before the first batch
is fetched, re-applies the setting in force at the restored step. The setting is a function of the step, so
the callback keeps no state of its own in the checkpoint.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

import lightning as L
from lightning.pytorch.callbacks import Callback


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_phase(step: Any, value: Any) -> tuple[int, Phase]:
    """One schedule entry as (step, Phase), or a one-line error saying what is wrong with it."""
    if not _is_int(step) or step < 0:
        raise ValueError(f"ContextExtension schedule step {step!r} must be an integer >= 0 (an optimizer step)")
    phase: Any = {"seq_len": value} if _is_int(value) else value
    if not isinstance(phase, dict) or not _is_int(phase.get("seq_len")) or set(phase) - {"seq_len", "rope_theta"}:
        raise ValueError(
            f"ContextExtension schedule entry {step}: {value!r} must be a seq_len or {{seq_len: N, rope_theta: X}}"
        )
    if phase["seq_len"] < 1:
        raise ValueError(f"ContextExtension schedule entry {step}: seq_len={phase['seq_len']} must be >= 1")
    theta = phase.get("rope_theta")
    if theta is not None and (isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 0):
        raise ValueError(f"ContextExtension schedule entry {step}: rope_theta={theta!r} must be a positive number")
    return step, Phase(**phase)


class ContextExtension(Callback):
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
        self.schedule: dict[int, Phase] = dict(sorted(_checked_phase(step, value) for step, value in schedule.items()))
        self._steps: list[int] = []
        self._settings: list[Setting] = []

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
        self._steps, self._settings = list(settings), list(settings.values())

    def setting_at(self, step: int) -> Setting:
        """The setting optimizer step `step` trains with (call after setup)."""
        return self._settings[bisect.bisect_right(self._steps, step) - 1]

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Make the next batch and forward use the setting of step `global_step` (a no-op when they do)."""
        setting = self.setting_at(trainer.global_step)
        data = trainer.datamodule
        if (data.seq_len, data.batch_size) != (setting.seq_len, setting.batch_size):
            data.set_seq_len(setting.seq_len, setting.batch_size)
        if pl_module.model_config.rope_theta != setting.rope_theta:
            pl_module.set_rope_theta(setting.rope_theta)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pl_module.log("train/seq_len", float(trainer.datamodule.seq_len), on_step=True, on_epoch=False, batch_size=1)
        self._apply(trainer, pl_module)
