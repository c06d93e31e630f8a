"""Learning-rate schedules as pure functions of the optimizer step.

Every schedule warms up linearly from 0 to the peak over `warmup_steps`, then:
- `cosine`: cosine decay to `min_lr_ratio` x peak at the last step (Moxin's pretraining: 10% of the peak);
- `linear`: linear decay to `min_lr_ratio` x peak (Tülu 3 / Moxin-Instruct SFT and DPO use it down to 0);
- `wsd`: warmup-stable-decay: stays at the peak, then decays linearly to `min_lr_ratio` x peak over the
  last `decay_ratio` of the run, so a run can be extended (or branched) from any stable-phase checkpoint;
- `constant`: stays at the peak (GRPO's setting).
"""

from __future__ import annotations

import math
from typing import Literal

ScheduleKind = Literal["cosine", "linear", "wsd", "constant"]


def lr_factor(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    kind: ScheduleKind = "cosine",
    min_lr_ratio: float = 0.1,
    decay_ratio: float = 0.2,
) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of a `total_steps` run."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "wsd":
        decay_steps = max(1, round(decay_ratio * total_steps))
        decay_start = max(warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return 1.0 - (1.0 - min_lr_ratio) * progress
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    if kind == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}; choose one of cosine, linear, wsd, constant")


def check_schedule(kind: str, *, warmup_steps: int, total_steps: int, min_lr_ratio: float, decay_ratio: float) -> None:
    """One-line errors for settings that would silently train with a wrong learning rate."""
    if kind not in ("cosine", "linear", "wsd", "constant"):
        raise ValueError(f"unknown schedule {kind!r}; choose one of cosine, linear, wsd, constant")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio} must be within [0, 1]")
    if not 0.0 < decay_ratio <= 1.0:
        raise ValueError(f"decay_ratio={decay_ratio} must be within (0, 1]")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
    if total_steps > 0 and warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} is not shorter than the run ({total_steps} steps); "
            "lower warmup_steps or raise trainer.max_steps"
        )
