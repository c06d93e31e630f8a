"""Distributed training gives the one-process result: DDP and FSDP2 on 2 CPU processes (gloo), gradient
accumulation, activation checkpointing under FSDP2, and resuming from an FSDP2 sharded checkpoint.

Every run trains the tiny Pretrain task on the same global batches (tests/distributed_runs.py), whose ranks and
micro-batches hold unequal numbers of target tokens: per-rank or per-micro-batch means would not match the
one-process loss, so these tests also check the global token normalisation. Reduction orders differ between
set-ups, so losses agree to 1e-5 relative and weights to 1e-5 absolute (after moving by ~4e-3); a resumed run
repeats the uninterrupted one bit for bit.

The 2-process runs are marked `distributed` (`pytest -m distributed`); each strategy's runs share one launch
(~15 s of it is importing Lightning in both processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import distributed_runs as runs

REPO = Path(__file__).resolve().parents[1]
# set in this process by an in-process distributed run; a child that inherits them would not start rank 1
_LAUNCH_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch(strategy: str, out: Path, names: list[str]) -> dict[str, dict]:
    """Run `names` (tests.distributed_runs.RUNS) in 2 processes; their steps, wrapping and final weights."""
    env = {key: value for key, value in os.environ.items() if key not in _LAUNCH_VARIABLES}
    command = [sys.executable, "-m", "tests.distributed_runs", strategy, "2", str(out), *names]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr[-3000:]}"
    results = {}
    for name in names:
        results[name] = json.loads((out / f"{name}.json").read_text())
        results[name]["weights"] = torch.load(out / f"{name}.pt", weights_only=True)
    return results


def train_here(**options) -> dict:
    """A one-process run in this process, with the thread count the runs use (restored afterwards)."""
    threads = torch.get_num_threads()
    try:
        return runs.train(**options)
    finally:
        torch.set_num_threads(threads)


def initial_weights() -> dict[str, torch.Tensor]:
    from moxin_lightning.tasks import Pretrain

    task = Pretrain(preset="moxin-tiny-9m", model_overrides=runs.TINY)
    task.configure_model()
    return task.full_state_dict()


def assert_same_training(result: dict, reference: dict, *, loss_rtol: float = 1e-5, weight_atol: float = 1e-5):
    """Same steps, losses and learning rates, and final weights that agree to `weight_atol`."""
    assert [s["step"] for s in result["steps"]] == [s["step"] for s in reference["steps"]]
    assert [s["lr"] for s in result["steps"]] == pytest.approx([s["lr"] for s in reference["steps"]], rel=1e-7)
    losses = [s["loss"] for s in result["steps"]]
    assert losses == pytest.approx([s["loss"] for s in reference["steps"]], rel=loss_rtol, abs=0)
    assert result["weights"].keys() == reference["weights"].keys()
    for name, weight in reference["weights"].items():
        torch.testing.assert_close(result["weights"][name], weight, rtol=0, atol=weight_atol, msg=name)


@pytest.fixture(scope="module")
def one_process() -> dict:
    """The reference: 1 process, the whole global batch of 4 rows per step."""
    result = train_here()
    start = initial_weights()
    # the comparisons below mean something only if training moved every tensor well beyond their tolerance
    moved = min((result["weights"][name] - start[name]).abs().max().item() for name in start)
    assert moved > 1e-3
    return result


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> dict[str, dict]:
    return launch("ddp", tmp_path_factory.mktemp("ddp"), ["plain", "accumulated", "sft_mean", "nan_on_last_rank"])


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("fsdp2")
    results = launch("fsdp2", out, ["saving", "checkpointed_activations", "resumed", "nan_on_last_rank"])
    results["checkpoints"] = out / "checkpoints"
    return results


def test_gradient_accumulation_8x1_equals_1x8():
    """One process: 8 micro-batches of 1 row make the same steps as 1 batch of 8 rows, although the rows hold
    different numbers of target tokens (the loss is normalised by the step's token count, not per micro-batch)."""
    whole = train_here(rows=8)
    accumulated = train_here(rows=8, accumulate=8)
    assert len(whole["steps"]) == runs.STEPS
    assert_same_training(accumulated, whole)


@pytest.mark.distributed
def test_ddp_matches_one_process(one_process, ddp):
    """2 processes x 2 rows (rank 0's rows hold ~1/4 of the targets of rank 1's) = 1 process x 4 rows."""
    assert_same_training(ddp["plain"], one_process)


@pytest.mark.distributed
def test_ddp_with_accumulation_matches_one_process(one_process, ddp):
    """2 processes x 2 micro-batches of 1 row = 1 process x 4 rows."""
    assert_same_training(ddp["accumulated"], one_process)


def test_sft_accumulation_8x1_equals_1x8_for_both_reductions():
    """SFT's `sum` (per token) and `mean` (per conversation: each row holds two, with unequal label counts)."""
    losses = {}
    for reduction in ("sum", "mean"):
        whole = train_here(rows=8, sft_reduction=reduction)
        assert_same_training(train_here(rows=8, accumulate=8, sft_reduction=reduction), whole)
        losses[reduction] = [step["loss"] for step in whole["steps"]]
    assert losses["sum"] != pytest.approx(losses["mean"], rel=1e-3)  # the two reductions really differ here


@pytest.mark.distributed
def test_sft_per_conversation_mean_on_2_processes_matches_one_process(ddp):
    """2 processes x 2 micro-batches of 1 row = 1 process x 4 rows, with the per-conversation `mean` reduction."""
    assert_same_training(ddp["sft_mean"], train_here(sft_reduction="mean"))


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(strategy, ddp, fsdp2):
    """Rank 1's loss is NaN at step 2, rank 0's is finite: both skip that step (no update, the schedule holds) and
    end with the weights of one process that skipped the same step; rank 0 counts the skip it did not see."""
    reference = train_here(nan_step=2)
    result = {"ddp": ddp, "fsdp2": fsdp2}[strategy]["nan_on_last_rank"]
    assert reference["skipped_steps"] == result["skipped_steps"] == 1
    assert [s["lr"] for s in result["steps"]] == pytest.approx([s["lr"] for s in reference["steps"]], rel=1e-7)
    for name, weight in reference["weights"].items():
        torch.testing.assert_close(result["weights"][name], weight, rtol=0, atol=1e-5, msg=name)
    unskipped = train_here()["weights"]
    assert any(not torch.allclose(unskipped[name], weight, atol=1e-4) for name, weight in reference["weights"].items())


@pytest.mark.distributed
def test_fsdp2_matches_one_process(one_process, fsdp2):
    assert_same_training(fsdp2["saving"], one_process)


@pytest.mark.distributed
def test_fsdp2_shards_every_block_and_keeps_names(one_process, fsdp2):
    """fully_shard per block and on the root; parameters are DTensors under their single-device names."""
    for run in ("saving", "checkpointed_activations"):
        assert fsdp2[run]["root_type"] == "FSDPTransformer"
        assert fsdp2[run]["block_types"] == ["FSDPBlock"] * runs.TINY["n_layers"]
        assert fsdp2[run]["dtensor_params"] == fsdp2[run]["params"]
        assert fsdp2[run]["params"] == sorted(one_process["weights"])
    assert fsdp2["saving"]["block_forwards"] == ["forward"] * runs.TINY["n_layers"]


@pytest.mark.distributed
def test_fsdp2_activation_checkpointing_changes_nothing(fsdp2):
    """Checkpointed blocks (applied before sharding, so FSDP2 wraps them) recompute the same activations."""
    assert fsdp2["checkpointed_activations"]["block_forwards"] == ["checkpointed"] * runs.TINY["n_layers"]
    assert_same_training(fsdp2["checkpointed_activations"], fsdp2["saving"], loss_rtol=1e-6, weight_atol=1e-6)


@pytest.mark.distributed
def test_fsdp2_resumes_from_its_sharded_checkpoint_exactly(fsdp2):
    """The step-3 checkpoint is a folder with one shard per rank, renamed into place whole (no staging folder
    left); fit(ckpt_path=it) runs steps 4-6 exactly as the uninterrupted run did: bit-identical weights."""
    folder = fsdp2["checkpoints"] / f"step={runs.CHECKPOINT_EVERY}.ckpt"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert sorted(p.name for p in fsdp2["checkpoints"].iterdir()) == ["last.ckpt", "step=3.ckpt", "step=6.ckpt"]
    resumed, uninterrupted = fsdp2["resumed"], fsdp2["saving"]
    assert [s["step"] for s in resumed["steps"]] == list(range(runs.CHECKPOINT_EVERY + 1, runs.STEPS + 1))
    assert resumed["steps"] == uninterrupted["steps"][runs.CHECKPOINT_EVERY :]
    for name, weight in uninterrupted["weights"].items():
        assert torch.equal(resumed["weights"][name], weight), name


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_grpo_learns_on_2_processes(tmp_path, strategy):
    """Rollouts on sharded weights (FSDP2: gathered once for the decoding loop) and on DDP: the single-token task
    is learned as on one process (mean reward from ~1/16 to >= 0.7 in 40 steps)."""
    env = {key: value for key, value in os.environ.items() if key not in _LAUNCH_VARIABLES}
    command = [sys.executable, "-m", "tests.grpo_runs", strategy, str(tmp_path / "rewards.json")]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rewards = json.loads((tmp_path / "rewards.json").read_text())
    assert len(rewards) == 40 and sum(rewards[:3]) / 3 < 0.3
    assert sum(rewards[-5:]) / 5 >= 0.7, rewards


@pytest.mark.distributed
def test_grpo_under_fsdp2_decodes_a_different_number_of_steps_on_each_rank(tmp_path):
    """Rank 0's rollouts end after 2 tokens, rank 1's run to 6 (as rollouts ending at their own EOS do): the ranks
    run different numbers of decode forwards, which must hold no collective (the weights are gathered once)."""
    env = {key: value for key, value in os.environ.items() if key not in _LAUNCH_VARIABLES}
    out = tmp_path / "lengths.json"
    command = [sys.executable, "-m", "tests.grpo_runs", "fsdp2", str(out), "varied"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    short, long = (json.loads(Path(f"{out}.rank{rank}").read_text()) for rank in (0, 1))
    assert len(short) == len(long) == 4
    assert max(short) <= 2 < max(long) <= 6  # rank 1 decoded more steps than rank 0 in some step


@pytest.mark.distributed
def test_a_sharded_checkpoint_opens_for_inference_with_the_final_weights(fsdp2, tmp_path, monkeypatch):
    """`load_model` (generate / export / eval) reads the FSDP2 folder into one full model; this run's data has no
    tokenizer, so one is given by path and checked against the vocabulary."""
    from moxin_lightning.checkpoint import load_model
    from tests.test_inference import train_sentencepiece

    monkeypatch.setenv("MOXIN_CACHE", str(tmp_path / "cache"))
    tokenizer = train_sentencepiece(
        tmp_path / "tok",
        vocab_size=200,
        texts=["The quick brown fox jumps over the lazy dog."] * 50,
        byte_fallback=False,
    )
    loaded = load_model(fsdp2["checkpoints"] / f"step={runs.STEPS}.ckpt", tokenizer=tokenizer.path)
    state = loaded.model.state_dict()
    for name, weight in fsdp2["saving"]["weights"].items():
        assert torch.equal(state[name], weight), name
