"""What `fit` checks before any logger, model or run folder starts (`moxin_lightning.preflight`), through the real
command line: a wrong schedule or dataset exits 2 with one line and leaves no W&B run and no run folder behind;
a run shorter than its validation interval validates at its end instead of failing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.prepared_data import fresh_environment, write_tiny_fit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_logged_fit(tmp_path) -> Path:
    """A tiny pretraining config on a prepared folder, with the offline W&B logger the shipped configs use."""
    return write_tiny_fit(
        tmp_path,
        f"""  max_steps: 6
  val_check_interval: 50
  logger:
    class_path: moxin_lightning.loggers.WandbLogger
    init_args: {{project: moxin, name: tiny, save_dir: {tmp_path / "run"}}}
  callbacks:
    - class_path: moxin_lightning.callbacks.CheckpointPromotion
      init_args: {{dirpath: {tmp_path / "run" / "release"}}}
""",
    )


def fit(tmp_path: Path, config: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moxin_lightning", "fit", "--config", str(config), *flags],
        cwd=ROOT, env={**fresh_environment(tmp_path), "WANDB_MODE": "offline"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--model.init_args.warmup_steps=6", "error: warmup_steps=6 is not shorter than the run (6 steps); "
         "lower warmup_steps or raise trainer.max_steps"),
        ("--model.init_args.lr=0", "error: model.init_args.lr=0.0 must be > 0 (the peak learning rate)"),
        ("--data.init_args.seq_len=4096", "error: seq_len=4096 exceeds the model's max_seq_len=256; lower seq_len"),
    ],
)  # fmt: skip
def test_schedule_and_data_mistakes_stop_before_any_logger_or_run_folder(tmp_path, tiny_logged_fit, flag, message):
    result = fit(tmp_path, tiny_logged_fit, flag)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in result.stderr and "wandb:" not in result.stderr + result.stdout
    assert not (tmp_path / "run").exists()  # no offline W&B run, no config.yaml, no lock


def test_a_held_out_split_too_small_for_one_batch_stops_before_any_logger(tmp_path, tiny_logged_fit):
    """The validation pass is made from the whole held-out split (the same on every process) before any logger or
    run folder starts: too few tokens for one batch is one line there, not an error in the sanity check."""
    held_out = json.loads((tmp_path / "data" / "manifest.json").read_text())["splits"]["val"]["tokens"]
    result = fit(tmp_path, tiny_logged_fit, "--data.init_args.batch_size=64")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the held-out splits hold {held_out} tokens, less than one validation batch of 64 x 32; prepare the "
        "data with a larger --val_fraction, or set data.val_batches=0 for no validation"
    )
    assert "wandb:" not in result.stderr + result.stdout and not (tmp_path / "run").exists()


def test_a_run_shorter_than_its_validation_interval_validates_at_its_end(tmp_path, tiny_logged_fit):
    result = fit(tmp_path, tiny_logged_fit)
    assert result.returncode == 0, result.stderr[-3000:]
    said = "fit: val_check_interval=50 is longer than this run's 6 batches (max_steps=6); validating at its end instead"
    assert said in result.stdout + result.stderr
    curves = json.loads((tmp_path / "run" / "release" / "loss_curves.json").read_text())
    assert [step for step, _ in curves["val"]] == [0, 6]
