"""What goes into a release besides the weights: `Release`, the `LossCurves` it carries and the `Panel`s it draws.

Kept apart from the writer so that the card, the plots, the MOF evidence and the samples can read a `Release`
without importing the code that writes it (the imports stay one-way: contents <- plots <- card, mof, samples <-
write), and so that a task can declare its panels without importing Lightning or matplotlib.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Point = tuple[int, float]

VALIDATION_PREFIX = "val/"


@dataclass(frozen=True)
class Panel:
    """One picture of a release, `<name>.png`: logged metrics against the optimizer step.

    A task declares its panels (`TrainingTask.release_panels`), so that a release shows what its objective is about
    (DPO's reward accuracy, GRPO's completion length) while the promotion callback and the writer stay the same for
    every task. A metric named `val/...` is recorded at every validation, the first at step 0; any other after every
    optimizer step, and drawn raw (faint) under its smoothed curve.

    name: the file's stem and the panel's key in `loss_curves.json` (letters, digits, `_`, `-`).
    label: what the y axis shows, in words (the card's heading for the panel).
    metrics: the logged names it draws, e.g. `("train/rewards_accuracy", "val/rewards_accuracy")`.
    """

    name: str
    label: str
    metrics: tuple[str, ...]

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            raise ValueError(f"panel name {self.name!r} becomes a file name: use letters, digits, _ and - only")
        if not self.metrics:
            raise ValueError(f"panel {self.name!r} names no metric to draw")
        object.__setattr__(self, "metrics", tuple(self.metrics))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "metrics": list(self.metrics), "file": f"{self.name}.png"}


@dataclass
class LossCurves:
    """(step, value) points of logged metrics, in step order: what a release's panels draw.

    train: `train_metric` (the training loss) after every optimizer step, from step 1.
    val: `monitor` (the validation loss) at every validation; step 0 is the starting weights, before any update.
    series: every other recorded metric by its logged name (e.g. `train/rewards_accuracy`).

    A point at or before the last recorded step replaces everything from that step on: a run resumed from an
    older checkpoint replays those steps, and the curve must show the replay, not both."""

    train: list[Point] = field(default_factory=list)
    val: list[Point] = field(default_factory=list)
    series: dict[str, list[Point]] = field(default_factory=dict)
    train_metric: str = "train/loss"
    monitor: str = "val/loss"

    def add_train(self, step: int, loss: float) -> None:
        _add_point(self.train, step, loss)

    def add_val(self, step: int, loss: float) -> None:
        _add_point(self.val, step, loss)

    def add(self, metric: str, step: int, value: float) -> None:
        """Record a point of any metric; the training loss and the monitor go to `train` and `val`."""
        if metric == self.train_metric:
            self.add_train(step, value)
        elif metric == self.monitor:
            self.add_val(step, value)
        else:
            _add_point(self.series.setdefault(metric, []), step, value)

    def points(self, metric: str) -> list[Point]:
        """The recorded points of a logged metric (none recorded: an empty list)."""
        if metric == self.train_metric:
            return self.train
        if metric == self.monitor:
            return self.val
        return self.series.get(metric, [])

    def is_per_step(self, metric: str) -> bool:
        """Whether the metric is recorded after every optimizer step (and so smoothed), not at validations."""
        return metric == self.train_metric or (metric != self.monitor and not metric.startswith(VALIDATION_PREFIX))

    def to_dict(self) -> dict[str, Any]:
        return {
            "train": _as_lists(self.train),
            "val": _as_lists(self.val),
            "train_metric": self.train_metric,
            "monitor": self.monitor,
            "series": {name: _as_lists(points) for name, points in self.series.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LossCurves:
        """Also reads the older form, `{"train": ..., "val": ...}` alone (a checkpoint from before the series)."""
        return cls(
            train=_as_points(data.get("train", [])),
            val=_as_points(data.get("val", [])),
            series={name: _as_points(points) for name, points in data.get("series", {}).items()},
            train_metric=data.get("train_metric", "train/loss"),
            monitor=data.get("monitor", "val/loss"),
        )


def _as_lists(points: list[Point]) -> list[list[float]]:
    return [[step, value] for step, value in points]


def _as_points(points: Any) -> list[Point]:
    return [(int(step), float(value)) for step, value in points]


def _add_point(points: list[Point], step: int, value: float) -> None:
    while points and points[-1][0] >= step:
        points.pop()
    points.append((int(step), float(value)))


@dataclass
class Release:
    """Everything in a release besides the weights; each part is optional and left out when empty.

    run_config: the resolved configuration as YAML text, or a mapping (written as YAML).
    data_manifests: folder name under data/ -> a prepared dataset's manifest.
    metrics: final metric name -> value.
    training: facts about the run for the card (global_step, tokens_seen, seq_len, batch_size, ...).
    curves: the recorded points of the logged metrics the panels draw.
    panels: the pictures to draw, one `<name>.png` each (a panel without any point is left out). Empty: one panel,
        `loss.png`, of the curves' training loss and monitor.
    smoothing: beta of the debiased exponential moving average drawn over each per-step metric (0: none).
    sample_prompts: prompts whose greedy continuations (`sample_tokens` new tokens) go into samples.json;
        they need a tokenizer.
    include_code: copy the source of moxin_lightning, callbacks and datamodules into code/.
    technical_report: a file copied into the release as the technical report.
    """

    name: str = "moxin_lightning model"
    description: str = ""
    tokenizer: Any = None
    run_config: str | Mapping[str, Any] | None = None
    data_manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    curves: LossCurves = field(default_factory=LossCurves)
    panels: list[Panel] = field(default_factory=list)
    smoothing: float = 0.9
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 32
    include_code: bool = True
    technical_report: str | None = None
