"""Exact resume: a run killed with SIGKILL and resumed from its last checkpoint ends with the weights of an
uninterrupted run, bit for bit; a crash while a checkpoint is written leaves the previous one loadable.

The runs go through the real command line (`python -m moxin_lightning fit --config run.yaml`) on a prepared
dataset streamed by PretrainData (shuffled, validation every 4 steps) with a tiny model, on the CPU. They start
in the repository root, so that the YAML can name the test callbacks of `tests/run_callbacks.py`; everything
they write goes to the test's tmp_path.

Single-file checkpoints (1 process, DDP) are written by `moxin_lightning.checkpoint_io.AtomicCheckpointIO`
(the CLI installs it) to a temporary sibling file, then renamed over their name; Lightning's own IO goes
through TMPDIR, which is a rename only when TMPDIR is on the checkpoint's file system. Sharded checkpoints
(FSDP2) are built in a staging folder beside their name and renamed (moxin_lightning.strategies.FSDP2); the
tests below check both.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from moxin_lightning.atomic import remove_stale_temporaries
from moxin_lightning.checkpoint_io import CheckpointWriteError
from tests import distributed_runs as runs
from tests.distributed_runs import TINY
from tests.prepared_data import write_dataset

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
EVERY = 3  # checkpoints at steps 3 and 6 (and last.ckpt each time)


def run_config(folder: Path, data: Path, callbacks: list[dict], **trainer) -> Path:
    """The YAML of a run writing into `folder`, with extra `callbacks` (class_path/init_args dicts) and
    `trainer` settings."""
    config = {
        "seed_everything": 1234,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": STEPS,
            "val_check_interval": 4,
            "gradient_clip_val": 1.0,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(folder),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(folder / "checkpoints"),
                        "every_n_train_steps": EVERY,
                        "save_top_k": -1,
                        "save_last": True,
                    },
                },
                *callbacks,
            ],
            **trainer,
        },
        "model": {
            "class_path": "moxin_lightning.tasks.Pretrain",
            "init_args": {"preset": "moxin-tiny-9m", "model_overrides": TINY, "lr": 1e-3, "warmup_steps": 2},
        },
        "data": {
            "class_path": "moxin_lightning.datamodules.pretrain.PretrainData",
            "init_args": {
                "datasets": [str(data)],
                "seq_len": 32,
                "batch_size": 4,
                "docs_per_read": 8,
                "val_batches": 2,
            },
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def record(path: Path) -> dict:
    return {"class_path": "tests.run_callbacks.RecordRun", "init_args": {"path": str(path)}}


def fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python -m moxin_lightning fit --config config ...` in the repository root, one thread, TMPDIR beside
    the config."""
    tmpdir = config.parent / "tmp"
    tmpdir.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmpdir), "MOXIN_TRACEBACK": "1"}
    command = [sys.executable, "-m", "moxin_lightning", "fit", "--config", str(config), *extra]
    # a session of its own: a killed rank 0 leaves no rank 1 behind in ours
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180, start_new_session=True
    )


def check(done: subprocess.CompletedProcess, returncode: int = 0) -> None:
    assert done.returncode == returncode, f"exit {done.returncode}, expected {returncode}:\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "a", 0, 300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data) -> dict:
    """Run A: 8 steps in one go."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    check(fit(run_config(folder, data, [record(folder / "result.pt")])))
    result = torch.load(folder / "result.pt", weights_only=True)
    assert [s["step"] for s in result["steps"]] == list(range(1, STEPS + 1))
    return result


def assert_continues(resumed: dict, uninterrupted: dict, from_step: int) -> None:
    """The resumed run made steps from_step+1.. with the same losses and learning rates (so the optimizer, the
    schedule and the data stream all continued), and ended with bit-identical weights."""
    assert [s["step"] for s in resumed["steps"]] == list(range(from_step + 1, STEPS + 1))
    assert resumed["steps"] == uninterrupted["steps"][from_step:]
    assert resumed["weights"].keys() == uninterrupted["weights"].keys()
    for name, weight in uninterrupted["weights"].items():
        assert torch.equal(resumed["weights"][name], weight), name


@pytest.mark.slow
def test_sigkill_then_resume_from_last_gives_the_uninterrupted_weights(tmp_path, data, uninterrupted):
    """Run B dies by SIGKILL after step 5 (last checkpoint: step 3) and resumes with --ckpt_path last.ckpt."""
    killed = {"class_path": "tests.run_callbacks.KillAtStep", "init_args": {"step": 5}}
    config = run_config(tmp_path, data, [killed])
    check(fit(config), returncode=-signal.SIGKILL)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == EVERY

    resume = run_config(tmp_path, data, [record(tmp_path / "result.pt")])
    check(fit(resume, "--ckpt_path", str(last)))
    assert_continues(torch.load(tmp_path / "result.pt", weights_only=True), uninterrupted, from_step=EVERY)


@pytest.mark.distributed
def test_fsdp2_rank_killed_then_resumed_gives_the_uninterrupted_weights(tmp_path, data):
    """2 processes, FSDP2, sharded checkpoints: rank 1 dies by SIGKILL after step 5 (rank 0 then fails in
    its next collective, or Lightning's launcher kills it). Resuming from last.ckpt (step 3) puts each rank back
    at its own place in the data (all ranks' stream positions are in the checkpoint) and ends with the weights
    of the uninterrupted run."""
    fsdp2 = {"strategy": {"class_path": "moxin_lightning.strategies.FSDP2"}, "devices": 2}
    check(fit(run_config(tmp_path / "a", data, [record(tmp_path / "a.pt")], **fsdp2)))
    uninterrupted = torch.load(tmp_path / "a.pt", weights_only=True)

    killed = {"class_path": "tests.run_callbacks.KillAtStep", "init_args": {"step": 5, "rank": 1}}
    died = fit(run_config(tmp_path / "b", data, [killed], **fsdp2))
    assert died.returncode != 0, died.stderr[-3000:]
    checkpoints = tmp_path / "b" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt" / "meta.pt", weights_only=True)["global_step"] == EVERY
    assert hidden_siblings(checkpoints) == []

    resume = run_config(tmp_path / "b", data, [record(tmp_path / "b.pt")], **fsdp2)
    check(fit(resume, "--ckpt_path", str(checkpoints / "last.ckpt")))
    assert_continues(torch.load(tmp_path / "b.pt", weights_only=True), uninterrupted, from_step=EVERY)


@pytest.mark.slow
def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, data, uninterrupted):
    """Killed halfway through rewriting last.ckpt at step 6: last.ckpt is still step 3's, whole (the half-written
    bytes went to a temporary file), and resuming from it still ends with the uninterrupted weights."""
    dying = {"class_path": "tests.run_callbacks.KillWhileWritingCheckpoint", "init_args": {"step": 2 * EVERY}}
    config = run_config(tmp_path, data, [dying])
    check(fit(config), returncode=-signal.SIGKILL)
    checkpoints = tmp_path / "checkpoints"
    step3 = torch.load(checkpoints / f"epoch=0-step={EVERY}.ckpt", weights_only=True)
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["global_step"] == EVERY
    assert last["state_dict"].keys() == step3["state_dict"].keys()
    assert all(torch.equal(last["state_dict"][k], v) for k, v in step3["state_dict"].items())
    # the kill did interrupt a write: half a checkpoint lies in a hidden sibling, removed by the next save
    partial = [p for p in checkpoints.iterdir() if p.name.startswith(".last.ckpt.tmp-")]
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < (checkpoints / "last.ckpt").stat().st_size

    resume = run_config(tmp_path, data, [record(tmp_path / "result.pt")])
    check(fit(resume, "--ckpt_path", str(checkpoints / "last.ckpt")))
    assert_continues(torch.load(tmp_path / "result.pt", weights_only=True), uninterrupted, from_step=EVERY)
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]


# -- sharded checkpoints (FSDP2): written in a staging folder, then renamed into place -------------------------


@pytest.fixture
def fsdp2_here():
    """Runs tests.distributed_runs.train under FSDP2 on 1 process in this process (a 1-rank gloo group);
    afterwards the process group, the environment variables Lightning set and the thread count are restored."""
    from moxin_lightning.strategies import FSDP2

    environment, threads = dict(os.environ), torch.get_num_threads()
    yield lambda **options: runs.train(FSDP2(), 1, **options)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environment)
    torch.set_num_threads(threads)


def sharded_content(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint (weights and optimizer state), read back without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = folder.parent / f"{folder.name}.pt"
    dcp_to_torch_save(folder, flat)
    content = torch.load(flat, weights_only=True)
    flat.unlink()
    tensors = {}
    for section, values in content.items():
        for name, value in _leaves(values, section):
            tensors[name] = value
    return tensors


def _leaves(value, prefix: str):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{prefix}/{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _leaves(item, f"{prefix}/{index}")
    elif isinstance(value, torch.Tensor):
        yield prefix, value


def assert_same_content(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys() and len(left) > 21  # the 21 weights and the AdamW state
    for name, value in right.items():
        assert torch.equal(left[name], value), name


def hidden_siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_failed_sharded_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fsdp2_here):
    """The shards of last.ckpt at step 6 are half written when the save fails: last.ckpt is still step 3's,
    whole, and resuming from it ends with the weights of an uninterrupted run."""
    from lightning.pytorch.strategies import model_parallel

    write, saves_of_last = model_parallel._distributed_checkpoint_save, []

    def fail_halfway(state, path: Path) -> None:
        write(state, path)
        if path.name.startswith(".last.ckpt.tmp-"):
            saves_of_last.append(path)
            if len(saves_of_last) == 2:  # step 6's
                shard = next(path.glob("*.distcp"))
                shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
                raise OSError("injected: no space left on device")

    monkeypatch.setattr(model_parallel, "_distributed_checkpoint_save", fail_halfway)
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(CheckpointWriteError) as failed:
        fsdp2_here(checkpoint_dir=checkpoints)
    assert str(failed.value) == (
        f"could not write checkpoint {checkpoints / 'last.ckpt'}: injected: no space left on device"
    )
    monkeypatch.setattr(model_parallel, "_distributed_checkpoint_save", write)

    assert torch.load(checkpoints / "last.ckpt" / "meta.pt", weights_only=True)["global_step"] == runs.CHECKPOINT_EVERY
    assert_same_content(sharded_content(checkpoints / "last.ckpt"), sharded_content(checkpoints / "step=3.ckpt"))
    assert hidden_siblings(checkpoints) == []  # the failed save's half-written shards are gone

    uninterrupted = fsdp2_here()
    resumed = fsdp2_here(ckpt_path=checkpoints / "last.ckpt")
    assert resumed["steps"] == uninterrupted["steps"][runs.CHECKPOINT_EVERY :]
    for name, weight in uninterrupted["weights"].items():
        assert torch.equal(resumed["weights"][name], weight), name


def dead_pid() -> int:
    """The id of a process that has exited: what a killed run's temporary folders are named with."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def kill_between_renames(checkpoints: Path) -> None:
    """Leave what `swap_into_place` leaves when killed between its two renames while replacing last.ckpt with a
    new save (here step 3's content): the previous last.ckpt renamed aside, the new one still in staging."""
    pid = dead_pid()
    (checkpoints / "last.ckpt").rename(checkpoints / f".last.ckpt.old-{pid}-0a1b2c3d")
    shutil.copytree(checkpoints / "step=3.ckpt", checkpoints / f".last.ckpt.tmp-{pid}-4e5f6a7b")


def test_kill_between_the_renames_of_a_sharded_save_is_repaired(tmp_path, fsdp2_here):
    """remove_stale_temporaries (run before every sharded save) puts the previous last.ckpt back and deletes
    the staging folder of the killed save."""
    checkpoints = tmp_path / "checkpoints"
    fsdp2_here(checkpoint_dir=checkpoints)
    previous, newer = sharded_content(checkpoints / "last.ckpt"), sharded_content(checkpoints / "step=3.ckpt")
    assert previous.keys() == newer.keys()
    assert not torch.equal(previous["state_dict/model.embed.weight"], newer["state_dict/model.embed.weight"])
    kill_between_renames(checkpoints)
    assert not (checkpoints / "last.ckpt").exists()

    remove_stale_temporaries(checkpoints / "last.ckpt")
    assert hidden_siblings(checkpoints) == []
    assert_same_content(sharded_content(checkpoints / "last.ckpt"), previous)


def test_fsdp2_resumes_after_a_kill_between_the_renames(tmp_path, fsdp2_here):
    checkpoints = tmp_path / "checkpoints"
    run = fsdp2_here(checkpoint_dir=checkpoints)
    kill_between_renames(checkpoints)
    resumed = fsdp2_here(ckpt_path=checkpoints / "last.ckpt")  # step 6's, the end of the run
    assert resumed["steps"] == []
    for name, weight in run["weights"].items():
        assert torch.equal(resumed["weights"][name], weight), name
