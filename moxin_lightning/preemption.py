"""Preemption: SIGTERM (what SLURM, Kubernetes and most schedulers send before they stop a job) saves a
resumable checkpoint and ends the process with status 143, so that the scheduler (or the job script) requeues
it and the next start resumes with `--ckpt_path last`.

Lightning's signal connector turns SIGTERM into a flag that every rank sees at the end of the current
optimizer step (rank 0's flag is broadcast), where the loop raises `SIGTERMException`, a `SystemExit` whose
status is 0: a preempted job would look finished. `SaveOnPreemption` writes `last.ckpt` where each
ModelCheckpoint with `save_last` puts it (through the strategy, so FSDP2 writes its sharded folder), and the
CLI turns the exception into one line and exit 143 (128 + SIGTERM, what a shell reports for a job killed by it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

EXIT_PREEMPTED = 143


class SaveOnPreemption(L.Callback):
    """On SIGTERM during fit: save last.ckpt (each ModelCheckpoint with save_last, else
    `<default_root_dir>/checkpoints/last.ckpt`) and remember where, for the CLI's message."""

    def __init__(self) -> None:
        self.saved: list[str] = []
        self.step: int | None = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        self.step = trainer.global_step
        savers = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.save_last]
        for callback in savers:
            callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
            self.saved.append(callback.last_model_path)
        if not savers:
            path = str(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")
            trainer.save_checkpoint(path)
            self.saved.append(path)
        if trainer.is_global_zero:
            saved = ", ".join(self.saved)
            print(
                f"preempted (SIGTERM) after step {self.step}: saved {saved}; resume with --ckpt_path {self.saved[0]}",
                file=sys.stderr,
                flush=True,
            )
