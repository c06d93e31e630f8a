"""Runs that go wrong around their folder, their length, their checkpoints and their signals, through the real
command line (`python -m moxin_lightning fit --config run.yaml`, a tiny model on a prepared dataset, CPU):

- a resume takes the config's lr and schedule, and refuses another model shape in one line;
- a second run into a locked folder, or over a finished run, is refused in one line (`--overwrite` starts over);
- a run with no length is refused before any work;
- SIGTERM saves last.ckpt and exits 143, and resuming from it ends with the uninterrupted run's weights;
- a checkpoint that cannot be written is one line, exit 2, and the previous last.ckpt is intact;
- a sweep whose every trial failed exits non-zero.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moxin_lightning.run_folder import RunFolder
from moxin_lightning.schedules import lr_factor
from tests.prepared_data import write_dataset
from tests.test_resume import EVERY, STEPS, assert_continues, record, run_config

REPO = Path(__file__).resolve().parents[2]


def command(*words: str, cwd: Path = REPO) -> list[str]:
    return [sys.executable, "-m", "moxin_lightning", *words]


def environment(folder: Path) -> dict[str, str]:
    tmpdir = folder / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmpdir)}
    env.pop("MOXIN_TRACEBACK", None)
    return env


def fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command("fit", "--config", str(config), *extra),
        cwd=REPO,
        env=environment(config.parent),
        capture_output=True,
        text=True,
        timeout=300,
    )


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


def ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "a", 0, 300)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data) -> Path:
    """A run of EVERY steps that finished: checkpoints/last.ckpt at step EVERY."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    ok(fit(run_config(folder, data, [], max_steps=EVERY, val_check_interval=EVERY)))
    return folder


def copy_of(finished: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    shutil.copytree(finished, folder, ignore=shutil.ignore_patterns("tmp", "run.lock*"))
    return folder


def checkpoint_names(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "checkpoints").iterdir())


# -- resume: what may change and what may not ----------------------------------------------------------------


def test_resume_with_a_new_lr_and_length_trains_with_them(tmp_path, data, finished):
    folder = copy_of(finished, tmp_path)
    config = run_config(folder, data, [record(folder / "result.pt")], max_steps=6)
    ok(fit(config, "--ckpt_path", str(folder / "checkpoints" / "last.ckpt"), "--model.init_args.lr=5e-4"))
    steps = torch.load(folder / "result.pt", weights_only=True)["steps"]
    assert [s["step"] for s in steps] == [4, 5, 6]
    # the lr logged before step s is the new peak times the new 6-step schedule's factor (warmup 2, cosine)
    expected = [5e-4 * lr_factor(s - 1, total_steps=6, warmup_steps=2) for s in (4, 5, 6)]
    assert [s["lr"] for s in steps] == pytest.approx(expected, rel=1e-6)


def test_resume_with_another_model_size_is_refused_in_one_line(tmp_path, data, finished):
    folder = copy_of(finished, tmp_path)
    last = folder / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    done = fit(run_config(folder, data, []), "--ckpt_path", str(last), "--model.init_args.model_overrides.dim=96")
    assert done.returncode == 2, done.stderr[-3000:]
    assert error_lines(done) == [
        f"error: --ckpt_path {last} holds a model with dim=64; the config gives dim=96 "
        "(a resumed run keeps its model; start a new run with init_from to change it)"
    ]
    assert last.read_bytes() == before


# -- one run per folder ----------------------------------------------------------------------------------------


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_first(tmp_path, data):
    folder = tmp_path / "run"
    first = RunFolder(folder)
    first.acquire()  # this test process plays the first run
    try:
        done = fit(run_config(folder, data, []))
    finally:
        first.release()
    assert done.returncode == 2, done.stderr[-3000:]
    assert error_lines(done) == [
        f"error: {folder} is in use by another run (process {os.getpid()} on host {socket.gethostname()}); "
        "wait for it to end or set another trainer.default_root_dir"
    ]
    assert not (folder / "checkpoints").exists()


@pytest.mark.slow
def test_a_rerun_over_a_finished_run_is_refused_unless_overwrite(tmp_path, data, finished):
    folder = copy_of(finished, tmp_path)
    names = checkpoint_names(folder)
    done = fit(run_config(folder, data, [], max_steps=EVERY))
    assert done.returncode == 2, done.stderr[-3000:]
    assert error_lines(done) == [
        f"error: {folder / 'checkpoints' / names[0]} is left from an earlier run; resume it with --ckpt_path "
        "(e.g. --ckpt_path last), or pass --overwrite to delete its checkpoints and release and start over"
    ]
    assert checkpoint_names(folder) == names

    ok(fit(run_config(folder, data, [], max_steps=2 * EVERY), "--overwrite"))
    # the earlier run's files were deleted first: no last-v1.ckpt beside a stale last.ckpt
    assert checkpoint_names(folder) == [f"epoch=0-step={EVERY}.ckpt", f"epoch=0-step={2 * EVERY}.ckpt", "last.ckpt"]
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2 * EVERY


def test_a_run_with_no_length_is_refused_before_any_work(tmp_path, data):
    folder = tmp_path / "run"
    config = run_config(folder, data, [])
    started = time.perf_counter()
    done = fit(config, "--trainer.max_steps=-1")
    assert done.returncode == 2, done.stderr[-3000:]
    assert error_lines(done) == [
        "error: the run has no length: set trainer.max_steps (or trainer.max_epochs / trainer.max_time), "
        "or pass --allow_infinite to train until stopped"
    ]
    assert sorted(p.name for p in folder.iterdir()) == ["run.yaml", "tmp"]  # no lock, log or checkpoint
    assert time.perf_counter() - started < 60


# -- preemption ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_saves_last_and_exits_143_and_the_resume_ends_like_an_uninterrupted_run(tmp_path, data):
    uninterrupted = tmp_path / "a"
    ok(fit(run_config(uninterrupted, data, [record(uninterrupted / "result.pt")])))

    folder = tmp_path / "b"
    marker = tmp_path / "paused"
    pause = {"class_path": "tests.faults.run_callbacks.PauseAtStep", "init_args": {"step": 5, "marker": str(marker)}}
    config = run_config(folder, data, [pause])
    process = subprocess.Popen(
        command("fit", "--config", str(config)),
        cwd=REPO,
        env=environment(folder),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), process.communicate()[1][-3000:]
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    last = folder / "checkpoints" / "last.ckpt"
    assert f"preempted (SIGTERM) after step 5: saved {last}; resume with --ckpt_path {last}" in stderr
    assert torch.load(last, weights_only=True)["global_step"] == 5

    resume = run_config(folder, data, [record(folder / "result.pt")])
    ok(fit(resume, "--ckpt_path", "last"))  # Lightning's: the newest last.ckpt of the run's ModelCheckpoint
    resumed = torch.load(folder / "result.pt", weights_only=True)
    assert_continues(resumed, torch.load(uninterrupted / "result.pt", weights_only=True), from_step=5)
    assert len(resumed["steps"]) == STEPS - 5


# -- a checkpoint that cannot be written -----------------------------------------------------------------------


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, data):
    folder = tmp_path / "run"
    failing = {"class_path": "tests.faults.run_callbacks.FailCheckpointWrites", "init_args": {"step": 2 * EVERY}}
    done = fit(run_config(folder, data, [failing]))
    assert done.returncode == 2, done.stderr[-3000:]
    failed = folder / "checkpoints" / f"epoch=0-step={2 * EVERY}.ckpt"
    assert error_lines(done) == [f"error: could not write checkpoint {failed}: No space left on device"]
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == EVERY
    assert checkpoint_names(folder) == [f"epoch=0-step={EVERY}.ckpt", "last.ckpt"]  # no temporary left
