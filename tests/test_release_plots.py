"""What a release shows of its stage: the panels a task declares, recorded by CheckpointPromotion.

Pretraining: the training loss with its smoothed curve, and the validation loss from step 0 (the starting weights,
scored on the whole validation set). DPO: reward accuracy and margin besides the loss. GRPO: mean reward, completion
length and truncation rate. Each on a tiny CPU run, checked against the values the task logged; the smoothing and
the pictures also against known inputs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from moxin_lightning.callbacks import CheckpointPromotion
from moxin_lightning.datamodules.pretrain import FixedBatches
from moxin_lightning.release import (
    EMA_FORMULA,
    LossCurves,
    Panel,
    curves_document,
    ema,
    final_values,
    format_value,
    panel_figure,
    plot_curves,
)
from moxin_lightning.tasks import DPO, GRPO, Pretrain

from .test_dpo_task import TINY as DPO_TINY
from .test_dpo_task import Pairs, collate
from .test_grpo_task import PROMPTS, DigitTokenizer, ExactAnswer
from .test_grpo_task import TINY as GRPO_TINY

STEPS = 4  # validation after steps 2 and 4, and at step 0


class Recorder(Callback):
    """The values the task logged, as Lightning holds them: per optimizer step, and per validation (not the check)."""

    def __init__(self, metrics: tuple[str, ...]) -> None:
        self.metrics = metrics
        self.train: dict[str, list[tuple[int, float]]] = {m: [] for m in metrics}
        self.val: dict[str, list[tuple[int, float]]] = {m: [] for m in metrics}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self._take(trainer, self.train)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._take(trainer, self.val)

    def _take(self, trainer, into: dict[str, list[tuple[int, float]]]) -> None:
        for metric in self.metrics:
            if metric in trainer.callback_metrics:
                into[metric].append((trainer.global_step, float(trainer.callback_metrics[metric])))


def run(task: L.LightningModule, data: L.LightningDataModule, root: Path, metrics: tuple[str, ...], **trainer):
    """A 4-step fit with validation every 2 steps and a 1-batch sanity check (the callback widens it)."""
    recorder = Recorder(metrics)
    promotion = CheckpointPromotion(dirpath=str(root / "release"), include_code=False)
    settings = dict(
        accelerator="cpu", devices=1, max_steps=STEPS, val_check_interval=2, num_sanity_val_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[promotion, recorder],
    )  # fmt: skip
    L.Trainer(**{**settings, **trainer}).fit(task, datamodule=data)
    return root / "release", recorder


def read_curves(release: Path) -> dict:
    return json.loads((release / "loss_curves.json").read_text())


def pngs(release: Path) -> list[str]:
    return sorted(p.name for p in release.glob("*.png"))


def points(values) -> list[tuple[int, float]]:
    return [(int(step), float(value)) for step, value in values]


# ----------------------------------------------------------------------------------------------
# smoothing and drawing, on known inputs


def test_the_smoothed_curve_is_the_debiased_ema_of_the_documented_formula():
    assert ema([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 5 / 3, 17 / 7])  # m = .5, 1.25, 2.125 over .5, .75, .875
    assert ema([4.0, 4.0, 4.0], 0.9) == pytest.approx([4.0, 4.0, 4.0])  # debiased: a constant stays put
    assert ema([3.0, 1.0, 2.0], 0.0) == [3.0, 1.0, 2.0]
    values = [5.0, 4.0, 4.5, 3.0, 3.5]
    moving, expected = 0.0, []
    for i, x in enumerate(values, start=1):  # EMA_FORMULA, written out
        moving = 0.9 * moving + 0.1 * x
        expected.append(moving / (1 - 0.9**i))
    assert ema(values, 0.9) == pytest.approx(expected, rel=1e-12)
    assert "m_i = beta * m_(i-1) + (1 - beta) * x_i; s_i = m_i / (1 - beta^i)" in EMA_FORMULA
    for beta in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"smoothing=.* must be in \[0, 1\)"):
            ema(values, beta)
        with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
            CheckpointPromotion(dirpath="r", smoothing=beta)


def known_curves() -> LossCurves:
    curves = LossCurves(train=[(1, 5.0), (2, 4.0), (3, 4.5)], val=[(0, 6.0), (3, 4.2)])
    curves.add("train/rewards_accuracy", 1, 0.5)
    curves.add("train/rewards_accuracy", 2, 0.75)
    curves.add("val/rewards_accuracy", 0, 0.0)
    return curves


PANELS = [
    Panel("loss", "loss", ("train/loss", "val/loss")),
    Panel("reward_accuracy", "reward accuracy", ("train/rewards_accuracy", "val/rewards_accuracy")),
    Panel("reward_margin", "reward margin", ("train/rewards_margin",)),  # never logged: no picture
]


def test_one_picture_per_panel_with_data_drawn_from_the_json(tmp_path):
    curves = known_curves()
    document = curves_document(curves, PANELS, 0.5)
    assert [p["name"] for p in document["panels"]] == ["loss", "reward_accuracy"]
    assert document["panels"][1] == {
        "name": "reward_accuracy", "label": "reward accuracy", "file": "reward_accuracy.png",
        "metrics": ["train/rewards_accuracy", "val/rewards_accuracy"],
    }  # fmt: skip
    assert (document["train"], document["val"]) == ([[1, 5.0], [2, 4.0], [3, 4.5]], [[0, 6.0], [3, 4.2]])
    assert document["series"] == {"train/rewards_accuracy": [[1, 0.5], [2, 0.75]], "val/rewards_accuracy": [[0, 0.0]]}
    assert document["smoothing"] == {
        "method": "debiased exponential moving average",
        "beta": 0.5,
        "formula": EMA_FORMULA,
    }
    assert set(document["smoothed"]) == {"train/loss", "train/rewards_accuracy"}  # validation points are not smoothed
    assert document["smoothed"]["train/loss"] == [[1, 5.0], [2, pytest.approx(13 / 3)], [3, pytest.approx(31 / 7)]]
    assert LossCurves.from_dict(json.loads(json.dumps(document))) == curves

    files = plot_curves(curves, PANELS, 0.5, tmp_path, title="t")
    assert [f.name for f in files] == ["loss.png", "reward_accuracy.png"] == pngs(tmp_path)
    figure = panel_figure(curves, PANELS[0], 0.5)
    (axes,) = figure.axes
    raw, smoothed, val = axes.get_lines()
    assert list(raw.get_ydata()) == [5.0, 4.0, 4.5] and raw.get_alpha() == 0.3  # faint
    assert list(smoothed.get_ydata()) == pytest.approx(ema([5.0, 4.0, 4.5], 0.5))
    assert (list(val.get_xdata()), list(val.get_ydata())) == ([0, 3], [6.0, 4.2])  # from step 0
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert labels == ["train/loss (raw)", "train/loss (EMA, beta=0.5, debiased)", "val/loss"]
    assert axes.get_ylabel() == "loss" and axes.get_xlabel() == "optimizer step"
    assert [len(panel_figure(curves, panel, 0.0).axes[0].get_lines()) for panel in PANELS[:2]] == [2, 2]  # no EMA

    assert final_values(curves, PANELS[0], 0.5) == [
        {"metric": "train/loss", "step": 3, "value": 4.5, "smoothed": pytest.approx(31 / 7)},
        {"metric": "val/loss", "step": 3, "value": 4.2, "smoothed": None},
    ]


def test_panels_are_checked_and_older_curves_still_load():
    with pytest.raises(ValueError, match="panel name 'reward accuracy' becomes a file name"):
        Panel("reward accuracy", "x", ("train/x",))
    with pytest.raises(ValueError, match="panel 'empty' names no metric"):
        Panel("empty", "x", ())
    from moxin_lightning.release.plots import check_panels

    with pytest.raises(ValueError, match="two release panels are named 'loss'"):
        check_panels([PANELS[0], Panel("loss", "again", ("val/loss",))])
    old = LossCurves.from_dict({"train": [[1, 2.0]], "val": [[2, 3.0]]})  # a checkpoint from before the series
    assert (old.train, old.val, old.series, old.train_metric, old.monitor) == (
        [(1, 2.0)], [(2, 3.0)], {}, "train/loss", "val/loss",
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# pretraining: the loss, smoothed, and the validation loss from step 0

PRETRAIN_TINY = dict(
    vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, max_seq_len=32,
    sliding_window=16,
)  # fmt: skip


class Tokens(L.LightningDataModule):
    """Random-token batches {input_ids, labels, doc_ids}; 3 validation batches (the sanity check's 1 is widened)."""

    @staticmethod
    def _batches(seed: int, count: int) -> FixedBatches:
        generator = torch.Generator().manual_seed(seed)
        batches = []
        for _ in range(count):
            ids = torch.randint(3, 64, (2, 17), generator=generator)
            batches.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:], "doc_ids": torch.zeros(2, 16).long()})
        return FixedBatches(batches)

    def train_dataloader(self):
        return self._batches(0, 8)

    def val_dataloader(self):
        return self._batches(1, 3)


def pretrain() -> Pretrain:
    return Pretrain(preset="moxin-tiny-9m", model_overrides=PRETRAIN_TINY, lr=3e-3, warmup_steps=0, seed=0)


def untrained_val_loss() -> float:
    """The starting weights (the same seed) scored by Lightning's own validation on the whole validation set."""
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(pretrain(), datamodule=Tokens(), verbose=False)[0]["val/loss"]


def test_pretraining_release_shows_the_smoothed_loss_and_the_validation_loss_from_step_0(tmp_path):
    release, logged = run(pretrain(), Tokens(), tmp_path, ("train/loss", "val/loss"))
    curves = read_curves(release)
    assert points(curves["train"]) == logged.train["train/loss"] and [s for s, _ in curves["train"]] == [1, 2, 3, 4]
    assert [s for s, _ in curves["val"]] == [0, 2, 4]
    assert curves["val"][0][1] == pytest.approx(untrained_val_loss(), rel=1e-6)  # the whole set, not the check's 1
    assert points(curves["val"][1:]) == logged.val["val/loss"]
    train = [v for _, v in curves["train"]]
    assert curves["smoothing"]["beta"] == 0.9 and curves["smoothed"]["train/loss"] == [
        [step, pytest.approx(value)] for step, value in zip([1, 2, 3, 4], ema(train, 0.9), strict=True)
    ]
    assert [p["name"] for p in curves["panels"]] == ["loss"] and pngs(release) == ["loss.png"]

    card = (release / "README.md").read_text()
    assert "![loss](loss.png)" in card and "debiased exponential moving average (beta = 0.9" in card
    assert f"| train/loss | 4 | {format_value(train[-1])} | {format_value(ema(train, 0.9)[-1])} |" in card
    assert f"| val/loss | 4 | {format_value(curves['val'][-1][1])} |  |" in card


def test_no_step_0_point_without_validate_at_start_or_without_a_sanity_check(tmp_path):
    for name, promotion, sanity in (("off", dict(validate_at_start=False), 1), ("nocheck", {}, 0)):
        callback = CheckpointPromotion(dirpath=str(tmp_path / name), include_code=False, **promotion)
        trainer = L.Trainer(
            accelerator="cpu", max_steps=STEPS, val_check_interval=2, num_sanity_val_steps=sanity, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
        )  # fmt: skip
        trainer.fit(pretrain(), datamodule=Tokens())
        assert [s for s, _ in read_curves(tmp_path / name)["val"]] == [2, 4], name


def test_two_promotions_both_get_step_0_and_the_trainer_gets_its_setting_back(tmp_path):
    callbacks = [CheckpointPromotion(dirpath=str(tmp_path / name), include_code=False) for name in ("a", "b")]
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, val_check_interval=2, num_sanity_val_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(pretrain(), datamodule=Tokens())
    first, second = (read_curves(tmp_path / name)["val"] for name in ("a", "b"))
    assert first == second and [s for s, _ in first] == [0, 2]
    assert trainer.num_sanity_val_steps == 1


# ----------------------------------------------------------------------------------------------
# DPO: reward accuracy and margin

DPO_METRICS = ("train/rewards_accuracy", "train/rewards_margin", "val/rewards_accuracy", "val/rewards_margin")


class PairsWithValidation(Pairs):
    def val_dataloader(self):
        return torch.utils.data.DataLoader(list(range(16, 24)), batch_size=4, collate_fn=collate)


def test_dpo_release_plots_reward_accuracy_and_margin_as_logged(tmp_path):
    task = DPO(preset="moxin-tiny-9m", model_overrides=DPO_TINY, lr=5e-3, warmup_steps=0, beta=0.5, seed=0)
    release, logged = run(task, PairsWithValidation(), tmp_path, DPO_METRICS)
    curves = read_curves(release)
    assert [p["name"] for p in curves["panels"]] == ["loss", "reward_accuracy", "reward_margin"]
    assert pngs(release) == ["loss.png", "reward_accuracy.png", "reward_margin.png"]
    for metric in ("train/rewards_accuracy", "train/rewards_margin"):
        assert points(curves["series"][metric]) == logged.train[metric] and len(logged.train[metric]) == STEPS
        assert [s for s, _ in curves["series"][metric]] == [1, 2, 3, 4]
    for metric in ("val/rewards_accuracy", "val/rewards_margin"):
        assert points(curves["series"][metric][1:]) == logged.val[metric]
    # step 0: the policy is the reference, so every margin is 0, none is above it, and the loss is ln 2
    assert curves["series"]["val/rewards_margin"][0] == [0, pytest.approx(0.0, abs=1e-6)]
    assert curves["series"]["val/rewards_accuracy"][0] == [0, 0.0]
    assert curves["val"][0] == [0, pytest.approx(math.log(2), abs=1e-5)]

    card = (release / "README.md").read_text()
    assert "![reward accuracy](reward_accuracy.png)" in card and "![reward margin (chosen - rejected)]" in card
    step, accuracy = logged.train["train/rewards_accuracy"][-1]
    smoothed = curves["smoothed"]["train/rewards_accuracy"]
    assert f"| train/rewards_accuracy | {step} | {format_value(accuracy)} | {format_value(smoothed[-1][1])} |" in card
    val_step, val_margin = logged.val["val/rewards_margin"][-1]
    assert f"| val/rewards_margin | {val_step} | {format_value(val_margin)} |  |" in card


# ----------------------------------------------------------------------------------------------
# GRPO: reward mean, completion length, truncation rate

GRPO_STATS = ("reward_mean", "completion_length", "truncation_rate")


class SavableDigits(DigitTokenizer):
    def save(self, folder) -> None:
        """Nothing to ship: the release writer asks every tokenizer to save itself."""


class PromptsWithValidation(L.LightningDataModule):
    tokenizer = SavableDigits()

    @staticmethod
    def _batches(count: int) -> FixedBatches:
        batch = {
            "prompt_ids": [[1, x] for x in PROMPTS],
            "prompt_text": [str(x) for x in PROMPTS],
            "answer": [str(x + 6) for x in PROMPTS],
            "prompt_index": torch.arange(len(PROMPTS)),
        }
        return FixedBatches([batch] * count)

    def train_dataloader(self):
        return self._batches(20)

    def val_dataloader(self):
        return self._batches(2)


def test_grpo_release_plots_reward_completion_length_and_truncation_as_logged(tmp_path):
    task = GRPO(
        rewards=[ExactAnswer()], preset="moxin-tiny-9m", model_overrides=GRPO_TINY, group_size=4, temperature=1.0,
        max_response_length=2, lr=3e-3, warmup_steps=0, schedule="constant", seed=0,
    )  # fmt: skip
    metrics = tuple(f"{stage}/{name}" for stage in ("train", "val") for name in GRPO_STATS)
    release, logged = run(task, PromptsWithValidation(), tmp_path, metrics)
    curves = read_curves(release)
    assert [p["name"] for p in curves["panels"]] == ["loss", *GRPO_STATS]
    assert pngs(release) == sorted(["loss.png", *(f"{name}.png" for name in GRPO_STATS)])
    for name in GRPO_STATS:
        assert points(curves["series"][f"train/{name}"]) == logged.train[f"train/{name}"]
        assert [s for s, _ in curves["series"][f"train/{name}"]] == [1, 2, 3, 4]
        assert [s for s, _ in curves["series"][f"val/{name}"]] == [0, 2, 4]
        assert points(curves["series"][f"val/{name}"][1:]) == logged.val[f"val/{name}"]
        assert set(curves["smoothed"]) >= {f"train/{name}"} and f"val/{name}" not in curves["smoothed"]
    for step, length in curves["series"]["train/completion_length"]:
        assert 1 <= length <= 2, (step, length)  # max_response_length=2
    card = (release / "README.md").read_text()
    step, rate = logged.train["train/truncation_rate"][-1]
    smoothed = curves["smoothed"]["train/truncation_rate"][-1][1]
    assert f"| train/truncation_rate | {step} | {format_value(rate)} | {format_value(smoothed)} |" in card
