"""What a run shows on the console: the same step bar in every stage (DPO and GRPO included, with their own
figures and honest tokens/s), and one line for each phase that would otherwise be silent (first-use builds, DPO's
reference scoring). The sweep's line per trial is tested with the sweep (tests/test_sweep.py)."""

from __future__ import annotations

import itertools
import logging
import re
from pathlib import Path

import lightning as L
import pytest

from moxin_lightning.callbacks import StepProgressBar, TrainingSpeed
from moxin_lightning.first_use import build_once, cached_folder
from moxin_lightning.tokenizers.local import LocalTokenizer
from tests.test_cli import ROOT, command_line, configs, printed_config  # noqa: F401  (autouse fixture)
from tests.test_dpo_task import Pairs, dpo
from tests.test_grpo_task import Prompts, grpo
from tests.test_tokenizers import ENGLISH

SPEED, BAR = "moxin_lightning.callbacks.TrainingSpeed", "moxin_lightning.callbacks.StepProgressBar"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """First-use builds and the DPO reference cache go to this test's own $MOXIN_CACHE."""
    monkeypatch.setenv("MOXIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# -- the configs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_dpo_and_grpo_configs_and_their_local_overlays_resolve_to_the_step_bar_and_training_speed(stage):
    """As in pretraining and SFT. The overlay lists the same callbacks as the full config, in the same order: two
    lists of one length merge entry by entry, where lists of two lengths would have the later replace the earlier."""
    full = printed_config(*configs(ROOT / "conf" / f"{stage}.yaml"))
    local = printed_config(*configs(ROOT / "conf" / f"{stage}.yaml", ROOT / "conf" / f"{stage}-local.yaml"))
    for config in (full, local):
        assert [entry["class_path"] for entry in config["trainer"]["callbacks"]][-2:] == [SPEED, BAR]
    assert [e["class_path"] for e in local["trainer"]["callbacks"]] == [
        e["class_path"] for e in full["trainer"]["callbacks"]
    ]


# -- the bar on DPO and GRPO runs ---------------------------------------------------------------------------


def fit_with_bar(task: L.LightningModule, data: L.LightningDataModule, steps: int, peak: float) -> L.Trainer:
    """Fit with the configs' two callbacks, in their order; each training step takes exactly one second of the
    speed callback's clock, so tokens/s is the tokens of a step and MFU its FLOPs over `peak`."""
    speed = TrainingSpeed(peak_flops=peak)
    speed.clock = itertools.count().__next__  # 0, 1, 2, ...: one call at the start and one per step
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[speed, StepProgressBar()],
    )  # fmt: skip
    trainer.fit(task, data)
    return trainer


def last_bar_line(printed: str) -> str:
    """The bar as last drawn (tqdm redraws it in place with carriage returns)."""
    return [line.strip() for line in re.split(r"[\r\n]", printed) if line.startswith("Training:")][-1]


def test_a_dpo_run_shows_the_step_bar_with_tokens_of_its_pairs_mfu_with_the_reference_and_reward_accuracy(capsys):
    """Two batches of 8 pairs a pass, 3 steps across passes. A batch runs 2 x 8 rows padded to 12 tokens (the
    longest rejected response) through the policy, forward and backward, and through the frozen reference,
    forward only: 192 tokens a step, and 4/3 of their training FLOPs."""
    task = dpo(reference="model")
    step_flops = 192 * task.model_config.flops_per_token(12) * 4 / 3
    trainer = fit_with_bar(task, Pairs(count=16, batch_size=8), steps=3, peak=4 * step_flops)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    assert metrics["train/tokens_seen"] == 3 * 192
    postfix = (
        f"loss={metrics['train/loss']:.4f}, tok/s=192, mfu=25.0%, "
        f"acc={metrics['train/rewards_accuracy']:.0%}, margin={metrics['train/rewards_margin']:.3f}"
    )
    line = last_bar_line(capsys.readouterr().out)
    assert line.startswith("Training: 100%") and " 3/3 [" in line and "step/s" in line, line
    assert line.endswith(postfix + "]"), line


def test_a_grpo_run_shows_the_step_bar_with_tokens_of_its_rollouts_sampling_included_and_the_mean_reward(capsys):
    """4 prompts [BOS, x] x 8 completions of one token: 32 rows of 3 tokens trained a step (96 tokens), and the
    FLOPs of training them plus a forward over them for sampling (4/3 of the training FLOPs)."""
    task = grpo()
    step_flops = 96 * task.model_config.flops_per_token(3) * 4 / 3
    trainer = fit_with_bar(task, Prompts(), steps=3, peak=2 * step_flops)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    assert metrics["train/tokens_seen"] == 3 * 96
    postfix = (
        f"loss={metrics['train/loss']:.4f}, tok/s=96, mfu=50.0%, "
        f"reward={metrics['train/reward_mean']:.3f}, gen tok/s={metrics['train/generation_tokens_per_s']:,.0f}"
    )
    line = last_bar_line(capsys.readouterr().out)
    assert line.startswith("Training: 100%") and " 3/3 [" in line, line
    assert line.endswith(postfix + "]"), line


def test_an_epoch_bounded_run_counts_optimizer_steps_to_the_end_of_its_last_epoch():
    """DPO, GRPO and SFT's full configs end at max_epochs, not max_steps: the bar counts to that step too."""
    bar = StepProgressBar()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
        enable_model_summary=False, callbacks=[bar],
    )  # fmt: skip
    trainer.fit(dpo(), Pairs(count=16, batch_size=4))  # 4 batches a pass, 2 per step, 2 passes: 4 steps
    tqdm_bar = bar.train_progress_bar
    assert (tqdm_bar.n, tqdm_bar.total, tqdm_bar.unit) == (4, 4, "step")


# -- silent phases get a line -------------------------------------------------------------------------------


def test_dpo_says_how_many_pairs_its_reference_scores_how_long_it_took_and_when_a_cache_is_reused(tmp_path, caplog):
    cache_dir = tmp_path / "reference"
    settings = dict(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False,
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        L.Trainer(**settings).fit(dpo(reference="cache", cache_dir=str(cache_dir)), Pairs(count=16))
    (path,) = cache_dir.glob("*.pt")
    lines = [message for message in caplog.messages if message.startswith("DPO:")]
    assert lines[0] == "DPO: scoring the reference on 16 train pairs (once, then cached)"
    assert re.fullmatch(
        rf"DPO: scored the reference on 16 train pairs in \d+\.\d s; cached in {re.escape(str(path))}", lines[1]
    )
    assert len(lines) == 2

    caplog.clear()
    with caplog.at_level(logging.INFO):
        L.Trainer(**settings).fit(dpo(reference="cache", cache_dir=str(cache_dir)), Pairs(count=16))
    assert [m for m in caplog.messages if m.startswith("DPO:")] == [
        f"DPO: reusing the reference log-probs of 16 train pairs cached in {path}"
    ]


def test_the_local_tokenizer_says_it_is_trained_on_first_use_and_only_then(tmp_path, cache, caplog):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(ENGLISH)
    with caplog.at_level(logging.INFO):
        tokenizer = LocalTokenizer(vocab_size=300, corpus=str(corpus))
        LocalTokenizer(vocab_size=300, corpus=str(corpus))  # cached: nothing to say
    folder = tokenizer.path.parent
    assert [m for m in caplog.messages if m.startswith("first use:")] == [
        f"first use: training a 300-piece tokenizer on {corpus} into {folder} (once; later runs reuse it)"
    ]
    assert folder.parent == cache / "tokenizers"


def test_a_first_use_build_says_what_it_builds_once_and_a_records_build_leaves_the_line_to_its_datamodule(caplog):
    built = []

    def build(folder: Path) -> None:
        folder.mkdir()
        built.append(folder)

    corpus, records = cached_folder("data", "builtin:local?max_mb=3-tok"), cached_folder("records", "chat-1234")
    with caplog.at_level(logging.INFO):
        build_once(corpus, Path.is_dir, build)
        build_once(corpus, Path.is_dir, build)  # built: silent
        build_once(records, Path.is_dir, build)  # datamodules.records names the raw files it prepares itself
    assert built == [corpus, records]
    assert [m for m in caplog.messages if m.startswith("first use:")] == [
        f"first use: preparing the built-in corpus into {corpus} (once; later runs reuse it)"
    ]
