"""GRPO on 2 processes: `python -m tests.grpo_runs STRATEGY OUT.json` (Lightning starts rank 1 itself).

Trains tests/test_grpo_task.py's single-token task and writes the per-step mean rewards (rank 0)."""

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


def main(strategy_name: str, out: str, steps: int = 40) -> None:
    from moxin_lightning.strategies import FSDP2

    recorder = RewardRecorder()
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
    trainer.fit(grpo(), Prompts())
    if trainer.is_global_zero:
        with open(out, "w") as file:
            json.dump(recorder.rewards, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
