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


class RecordRun(L.Callback):
    """Writes `path` at the end of training: {"steps": [{step, loss, lr}, ...], "weights": full state dict}.

    Steps are those this process ran (a resumed run starts after its checkpoint's step)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step > (self.steps[-1]["step"] if self.steps else 0):
            metrics = trainer.callback_metrics
            self.steps.append(
                {"step": trainer.global_step, "loss": metrics["train/loss"].item(), "lr": metrics["train/lr"].item()}
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        weights = pl_module.full_state_dict()  # a collective: every rank takes part
        if trainer.is_global_zero:
            torch.save({"steps": self.steps, "weights": weights}, self.path)


class KillAtStep(L.Callback):
    """SIGKILL this process right after optimizer step `step` (no handler, no cleanup: a node lost)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillWhileWritingCheckpoint(L.Callback):
    """SIGKILL this process halfway through writing the bytes of checkpoint file `name` at step `step`.

    Lightning writes single-file checkpoints through an fsspec local file (`TorchCheckpointIO` -> `_atomic_save`);
    this replaces that file's `write` so it writes the first half of the checkpoint, flushes it to disk and
    kills the process. ModelCheckpoint's hook runs after every other callback's, so arming here in
    `on_train_batch_end` catches the checkpoint of this same step."""

    def __init__(self, step: int, name: str = "last.ckpt") -> None:
        self.step, self.name = step, name

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        from fsspec.implementations.local import LocalFileOpener

        write, name = LocalFileOpener.write, self.name

        def write_half_then_die(opener: LocalFileOpener, data: bytes) -> int:
            if not str(opener.path).endswith(name):
                return write(opener, data)
            write(opener, data[: len(data) // 2])
            opener.f.flush()
            os.fsync(opener.f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
            return 0

        LocalFileOpener.write = write_half_then_die
