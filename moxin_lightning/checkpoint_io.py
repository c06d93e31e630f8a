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


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are a temporary sibling file, fsync'd, then `os.replace`d."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # object stores put an object whole; fsspec's transaction is right there
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)  # what a killed earlier save of this name left behind
        temporary = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
