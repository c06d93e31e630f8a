"""Callbacks the run-fault tests name in their YAML (`class_path: tests.faults.run_callbacks.X`)."""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Any

import lightning as L


class PauseAtStep(L.Callback):
    """After optimizer step `step`, write `marker` and wait (up to 60 s) until SIGTERM arrives, so that the test
    sends the signal from outside at a known step."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        Path(self.marker).write_text(str(trainer.global_step))
        deadline = time.monotonic() + 60
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)


class FailCheckpointWrites(L.Callback):
    """From optimizer step `step` on, every checkpoint write fails with ENOSPC (a full disk) halfway through."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        import torch

        def full_disk(obj: Any, target: Any, *a: Any, **kw: Any) -> None:
            if hasattr(target, "write"):
                target.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        torch.save = full_disk
