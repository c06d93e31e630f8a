"""The README's main job on 2 "nodes" of one machine (1 process each, gloo on 127.0.0.1), launched as users launch
it: `torchrun --nnodes 2 --nproc_per_node 1 --node_rank R --master_addr ... --master_port ...` on each node, and
plain `python -m moxin_lightning fit` processes with the variables `srun` sets, which Lightning's SLURMEnvironment
reads (that one sharded with FSDP2). The job is `fit --config conf/phase1.yaml --config conf/local.yaml` shortened
to 4 steps with validation at steps 0, 2 and 4 over 3 batches (an odd count: the second process scores one batch
and one padding batch).

What must hold: both processes exit 0 and exactly one release is written; validation on 2 processes gives the
one-process value: at step 0 (the same seeded weights on any number of processes) the single-process run's, and
at the end the release's weights scored here on one process over the same held-out batches, within 1e-5; resuming
from `last.ckpt` on 2 nodes continues the curve; the `srun`-style launch trains as torchrun's.

The first-use builds (tokenizer, corpus) happen once, in the single-process run, into this module's cache.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from moxin_lightning.datamodules import PretrainData
from moxin_lightning.hf import import_hf
from tests.prepared_data import fresh_environment

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
JOB = ["--config", str(ROOT / "conf" / "phase1.yaml"), "--config", str(ROOT / "conf" / "local.yaml")]
SHORT = [
    "--trainer.max_steps=4",
    "--model.init_args.warmup_steps=2",
    "--trainer.val_check_interval=2",
    "--data.init_args.val_batches=3",
]
NODES = ["--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.accelerator=cpu"]  # the README's flags
TORCHRUN = Path(sys.executable).with_name("torchrun")  # torch's console script, installed beside python
TIMEOUT = 300


def free_port() -> int:
    """A port nothing listens on now (the kernel picks it); a launch that loses it to another process is retried."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_environment(base: dict[str, str]) -> dict[str, str]:
    """`base` without any launcher's variables (this test may itself run under SLURM or torchrun), one thread per
    process (2 processes share the machine's cores)."""
    launched = ("SLURM_", "TORCHELASTIC_", "PL_")
    own = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {key: value for key, value in base.items() if not key.startswith(launched) and key not in own}
    return {**env, "OMP_NUM_THREADS": "1"}


def run_nodes(work: Path, env: dict[str, str], name: str, launch) -> list[tuple[int, str]]:
    """Start the 2 nodes `launch(rank, port)` gives (a command and its extra variables), wait for both; their exit
    codes and output. Retried on another port when one was taken between `free_port` and the launch."""
    for _attempt in range(3):
        port = free_port()
        processes = []
        for rank in (0, 1):
            command, extra = launch(rank, port)
            with (work / f"{name}-{rank}.log").open("w") as log:  # a file: a pipe left unread would fill and block
                processes.append(
                    subprocess.Popen(
                        command, cwd=work, env={**env, **extra}, stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True,  # a stuck node and its workers are killed as one group
                    )
                )  # fmt: skip
        try:
            codes = [process.wait(timeout=TIMEOUT) for process in processes]
        finally:
            for process in processes:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        outputs = [(work / f"{name}-{rank}.log").read_text() for rank in (0, 1)]
        if not any("address already in use" in output.lower() for output in outputs):
            return list(zip(codes, outputs, strict=True))
    raise AssertionError(f"{name}: no free port in 3 tries")


def torchrun(*arguments: str):
    """The README's torchrun line for node `rank` of 2, rendezvous at 127.0.0.1:port."""

    def launch(rank: int, port: int) -> tuple[list[str], dict[str, str]]:
        nodes = ["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank)]
        command = [str(TORCHRUN), *nodes, "--master_addr", "127.0.0.1", "--master_port", str(port)]
        return [*command, "-m", "moxin_lightning", "fit", *arguments], {}

    return launch


def srun_style(*arguments: str):
    """What `srun --nodes 2 --ntasks-per-node 1 python -m moxin_lightning fit ...` starts: the same command on each
    node, with SLURM's variables for its task."""

    def launch(rank: int, port: int) -> tuple[list[str], dict[str, str]]:
        slurm = {
            "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_NNODES": "2",
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": "0",
            "SLURM_NODEID": str(rank),
            "SLURM_JOB_NAME": "moxin-phase1",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "127.0.0.1",
            "SLURM_NODELIST": "127.0.0.1",
            "MASTER_PORT": str(port),  # Lightning's default is 15000 + the job id's last digits: taken or not
        }
        return [sys.executable, "-m", "moxin_lightning", "fit", *arguments], slurm

    return launch


def check_nodes(runs: list[tuple[int, str]]) -> None:
    for rank, (code, output) in enumerate(runs):
        assert code == 0, f"node {rank} exited with {code}:\n{output[-3000:]}"


def only_release(root: Path) -> Path:
    """The run folder holds exactly one release (the rank-0 process writes it; no staging folder is left)."""
    assert sorted(path.parent for path in root.rglob("mof.json")) == [root / "release"]
    assert [path.name for path in root.iterdir() if path.name.startswith(".")] == []
    return root / "release"


def validation_curve(release: Path) -> list[tuple[int, float]]:
    curve = [(int(step), float(loss)) for step, loss in json.loads((release / "loss_curves.json").read_text())["val"]]
    assert json.loads((release / "metrics.json").read_text())["metrics"]["val/loss"] == pytest.approx(curve[-1][1])
    return curve


def one_process_loss(release: Path, cache: Path) -> float:
    """The release's weights scored here, on one process, over the run's validation pass: the token-weighted mean of
    the held-out batches, what the run logs as val/loss."""
    (dataset,) = [folder for folder in (cache / "data").iterdir() if folder.is_dir()]  # the corpus, built once
    settings = yaml.safe_load((release / "config.yaml").read_text())["data"]["init_args"]
    keep = ("seq_len", "batch_size", "val_batches", "seed", "docs_per_read")
    data = PretrainData([str(dataset)], **{key: settings[key] for key in keep})
    model = import_hf(release).eval()
    loss = count = 0
    with torch.no_grad():
        for batch in data.validation_pass():
            batch_loss, batch_count = model(batch["input_ids"], doc_ids=batch["doc_ids"], targets=batch["labels"])
            loss, count = loss + batch_loss.double(), count + int(batch_count)
    assert count > 0
    return float(loss / count)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """An empty working folder (runs go to runs/NAME in it) and its environment: own home and first-use cache."""
    folder = tmp_path_factory.mktemp("nodes")
    (folder / "work").mkdir()
    return folder / "work", fresh_environment(folder)


@pytest.fixture(scope="module")
def one_process(work) -> list[tuple[int, float]]:
    """The shortened job on one process (it also makes the tokenizer and the corpus, once, for every run here)."""
    folder, env = work
    command = [sys.executable, "-m", "moxin_lightning", "fit", *JOB, *SHORT, "--trainer.default_root_dir=runs/one"]
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    release = only_release(folder / "runs" / "one")
    curve = validation_curve(release)
    assert [step for step, _ in curve] == [0, 2, 4]
    # the scoring below is the runs' own: the one-process run's final val/loss is its release scored here
    assert one_process_loss(release, Path(env["MOXIN_CACHE"])) == pytest.approx(curve[-1][1], abs=1e-5, rel=0)
    return curve


@pytest.fixture(scope="module")
def two_nodes(work, one_process) -> dict:
    """The shortened job launched with torchrun as 2 nodes (what the README shows for 8): its nodes' exit codes and
    output, run folder, validation curve and release scored on one process (kept: the resume test continues the
    run in place, as users do)."""
    folder, env = work
    launch = torchrun(*JOB, *SHORT, *NODES, "--trainer.default_root_dir=runs/two")
    nodes = run_nodes(folder, node_environment(env), "torchrun", launch)
    check_nodes(nodes)
    root = folder / "runs" / "two"
    release = only_release(root)
    return {
        "root": root,
        "curve": validation_curve(release),
        "one_process": one_process_loss(release, Path(env["MOXIN_CACHE"])),
    }


def test_torchrun_on_two_nodes_validates_as_one_process(one_process, two_nodes):
    """Exit 0 on both nodes, one release, and validation equal to one process's: at step 0 (the same seeded
    weights) the single-process run's value, at step 4 the release's weights scored on one process."""
    curve = two_nodes["curve"]
    assert [step for step, _ in curve] == [0, 2, 4]
    assert curve[0][1] == pytest.approx(one_process[0][1], abs=1e-5, rel=0)
    assert curve[-1][1] == pytest.approx(two_nodes["one_process"], abs=1e-5, rel=0)
    assert curve[-1][1] != pytest.approx(one_process[-1][1], abs=1e-3)  # 2 x 8 rows per step: another training


def test_srun_style_launch_with_fsdp2_trains_as_torchrun_with_ddp(work, one_process, two_nodes):
    """2 plain processes with SLURM's variables (no torchrun), sharded with FSDP2 as conf/phase1.yaml is (local.yaml
    makes it `auto`, DDP): every validation step gathers the weights from both processes, so the second process's
    padding batch must run. The validation curve is the torchrun DDP run's (the same 2-process training), the
    single-process run's value at step 0, and the release's weights scored on one process at the end."""
    folder, env = work
    fsdp2 = "--trainer.strategy.class_path=moxin_lightning.strategies.FSDP2"
    flags = [*SHORT, *NODES, fsdp2, "--trainer.default_root_dir=runs/srun"]
    check_nodes(run_nodes(folder, node_environment(env), "srun", srun_style(*JOB, *flags)))
    assert (folder / "runs" / "srun" / "checkpoints" / "last.ckpt" / "meta.pt").is_file()  # sharded: it was FSDP2
    curve = validation_curve(only_release(folder / "runs" / "srun"))
    assert [step for step, _ in curve] == [step for step, _ in two_nodes["curve"]] == [0, 2, 4]
    assert [loss for _, loss in curve] == pytest.approx([loss for _, loss in two_nodes["curve"]], abs=1e-5, rel=0)
    assert curve[0][1] == pytest.approx(one_process[0][1], abs=1e-5, rel=0)
    final = one_process_loss(folder / "runs" / "srun" / "release", Path(env["MOXIN_CACHE"]))
    assert curve[-1][1] == pytest.approx(final, abs=1e-5, rel=0)


def test_torchrun_resumes_the_two_node_run_from_its_last_checkpoint(work, two_nodes):
    """The 2-node run resumed from its last.ckpt on 2 nodes with 2 more steps, in place: the curve keeps the points
    before the resume, adds step 6, and its value is the new release's weights scored on one process."""
    folder, env = work
    flags = [*SHORT, "--trainer.max_steps=6", "--trainer.default_root_dir=runs/two"]
    checkpoint = folder / "runs" / "two" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"] == 4
    launch = torchrun(*JOB, *flags, *NODES, "--ckpt_path", "runs/two/checkpoints/last.ckpt")
    check_nodes(run_nodes(folder, node_environment(env), "resume", launch))
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"] == 6
    curve = validation_curve(only_release(two_nodes["root"]))
    assert curve[:3] == two_nodes["curve"] and [step for step, _ in curve] == [0, 2, 4, 6]
    final = one_process_loss(two_nodes["root"] / "release", Path(env["MOXIN_CACHE"]))
    assert curve[-1][1] == pytest.approx(final, abs=1e-5, rel=0)
