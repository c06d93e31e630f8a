"""What goes into a release besides the weights: `Release` and the `LossCurves` it carries.

Kept apart from the writer so that the card, the MOF evidence and the samples can read a `Release` without
importing the code that writes it (the imports stay one-way: contents <- card, mof, samples <- write).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LossCurves:
    """(step, loss) points of the training and validation loss, in step order.

    A point at or before the last recorded step replaces everything from that step on: a run resumed from an
    older checkpoint replays those steps, and the curve must show the replay, not both."""

    train: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)

    def add_train(self, step: int, loss: float) -> None:
        _add_point(self.train, step, loss)

    def add_val(self, step: int, loss: float) -> None:
        _add_point(self.val, step, loss)

    def to_dict(self) -> dict[str, list[list[float]]]:
        return {"train": [[s, v] for s, v in self.train], "val": [[s, v] for s, v in self.val]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LossCurves:
        return cls(
            train=[(int(s), float(v)) for s, v in data.get("train", [])],
            val=[(int(s), float(v)) for s, v in data.get("val", [])],
        )


def _add_point(points: list[tuple[int, float]], step: int, value: float) -> None:
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
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 32
    include_code: bool = True
    technical_report: str | None = None
