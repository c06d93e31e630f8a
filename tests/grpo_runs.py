"""GRPO on 2 processes: `python -m tests.grpo_runs STRATEGY OUT.json [varied]` (Lightning starts rank 1 itself).

Trains tests/test_grpo_task.py's single-token task and writes the per-step mean rewards (rank 0). `varied`: 4
steps in which rank 0's rollouts stop after 2 tokens and rank 1's after 6, as rollouts ending at their own EOS
do, so the ranks decode different numbers of steps; each rank writes its per-step completion lengths to
OUT.json.rank<R>."""

from __future__ import annotations

import json
import sys

import lightning as L

from tests.test_grpo_task import Prompts, grpo


class RewardRecorder(L.Callback):
    def __init__(self) -> None:
        self.rewards: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.rewards.append(trainer.callback_metrics["train/reward_mean"].item())


class RankLengths(L.Callback):
    """Rank 0 samples at most 2 tokens per rollout, rank 1 up to 6; records each step's mean completion length."""

    def __init__(self) -> None:
        self.lengths: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.max_response_length = 2 if trainer.global_rank == 0 else 6

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.lengths.append(trainer.callback_metrics["train/completion_length"].item())


def main(strategy_name: str, out: str, mode: str = "learn") -> None:
    from moxin_lightning.strategies import FSDP2

    varied = mode == "varied"
    steps = 4 if varied else 40
    recorder = RankLengths() if varied else RewardRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=FSDP2() if strategy_name == "fsdp2" else strategy_name,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(grpo(temperature=1.5) if varied else grpo(), Prompts())
    if varied:
        with open(f"{out}.rank{trainer.global_rank}", "w") as file:
            json.dump(recorder.lengths, file)
    elif trainer.is_global_zero:
        with open(out, "w") as file:
            json.dump(recorder.rewards, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
