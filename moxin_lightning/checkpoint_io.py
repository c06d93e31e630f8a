"""`AtomicCheckpointIO`: single-file checkpoints written beside their name, then renamed over it.

Lightning's `TorchCheckpointIO` writes through an fsspec transaction: a temporary file in TMPDIR, then
`shutil.move` to the checkpoint's name. When TMPDIR is on another file system (a node's local /tmp, checkpoints
on shared storage) that move copies into place, and a crash mid-copy destroys the previous checkpoint of that
name (last.ckpt). Writing the temporary file in the checkpoint's own folder makes the last step a rename.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from moxin_lightning.atomic import remove_stale_temporaries


class CheckpointReadError(ValueError):
    """A checkpoint file that torch cannot read (truncated, tampered with, not a checkpoint): one line, naming it."""


def unreadable_checkpoint(path: Any, error: BaseException) -> str:
    """The one-line message for a checkpoint file torch.load refused."""
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return (
        f"cannot read checkpoint {path}: it is truncated, damaged or not a checkpoint ({detail}); resume from "
        "another checkpoint (e.g. an earlier one in the same folder)"
    )


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, quota, permissions): reported as one line, not a traceback,
    because the fix is the user's (free space, another folder); the previous checkpoint of that name is intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are a temporary sibling file, fsync'd, then `os.replace`d."""

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        """Lightning's torch.load of `--ckpt_path`, with a truncated or foreign file named in one line (torch says
        "PytorchStreamReader failed reading zip archive" or an unpickling error, naming no file)."""
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (FileNotFoundError, IsADirectoryError):
            raise
        except Exception as error:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, ...
            raise CheckpointReadError(unreadable_checkpoint(path, error)) from error

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # object stores put an object whole; fsspec's transaction is right there
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CheckpointWriteError(f"could not write checkpoint {path}: {error.strerror or error}") from None
        remove_stale_temporaries(path)  # what a killed earlier save of this name left behind
        temporary = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except OSError as error:
            raise CheckpointWriteError(f"could not write checkpoint {path}: {error.strerror or error}") from None
        finally:
            temporary.unlink(missing_ok=True)
