"""Callbacks that the resume tests name in their YAML (`class_path: tests.run_callbacks.X`).

The tests run `python -m moxin_lightning fit` with the repository root as working directory, which puts it on
`sys.path`, so `tests` imports in that process (and in the ranks Lightning starts from it).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L
import torch


class StepRecorder(L.Callback):
    """train/loss and train/lr of every optimizer step (the task logs them once per step)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step > (self.steps[-1]["step"] if self.steps else 0):
            metrics = trainer.callback_metrics
            self.steps.append(
                {"step": trainer.global_step, "loss": metrics["train/loss"].item(), "lr": metrics["train/lr"].item()}
            )


class RecordRun(StepRecorder):
    """Writes `path` at the end of training: {"steps": [{step, loss, lr}, ...], "weights": full state dict}.

    Steps are those this process ran (a resumed run starts after its checkpoint's step)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        weights = pl_module.full_state_dict()  # a collective: every rank takes part
        if trainer.is_global_zero:
            torch.save({"steps": self.steps, "weights": weights}, self.path)


class KillAtStep(L.Callback):
    """SIGKILL the process of rank `rank` (None: every rank) right after optimizer step `step`: no handler, no
    cleanup, as when a node is lost."""

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), signal.SIGKILL)


class KillWhileWritingCheckpoint(L.Callback):
    """SIGKILL this process halfway through writing the bytes of checkpoint file `name` at step `step`.

    Single-file checkpoints are written with `torch.save` (into a temporary sibling by `AtomicCheckpointIO`, or
    through fsspec by Lightning's own IO); this replaces `torch.save` so that, for a target whose name contains
    `name`, it writes the first half of the serialized checkpoint, flushes it to disk and kills the process.
    ModelCheckpoint's hook runs after every other callback's, so arming here in `on_train_batch_end` catches the
    checkpoint of this same step."""

    def __init__(self, step: int, name: str = "last.ckpt") -> None:
        self.step, self.name = step, name

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        import io

        import torch

        save, name = torch.save, self.name

        def write_half_then_die(obj: Any, target: Any, *a: Any, **kw: Any) -> None:
            where = str(getattr(target, "name", target))
            if name not in where:
                return save(obj, target, *a, **kw)
            buffer = io.BytesIO()
            save(obj, buffer, *a, **kw)
            data = buffer.getvalue()
            if hasattr(target, "write"):
                target.write(data[: len(data) // 2])
                target.flush()
                os.fsync(target.fileno())
            else:
                with open(target, "wb") as file:
                    file.write(data[: len(data) // 2])
                    file.flush()
                    os.fsync(file.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = write_half_then_die
