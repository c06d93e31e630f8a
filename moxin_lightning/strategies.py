"""`FSDP2`: Lightning's `ModelParallelStrategy` set up as plain FSDP2 over every device, with atomic checkpoints.

`ModelParallelStrategy` is Lightning's FSDP2 path (its `strategy="fsdp"` is FSDP1 and refuses CPUs, so it
cannot be tested without a GPU). Left on "auto" it gives each node's devices to tensor parallelism, which our
tasks do not use; here the data-parallel size is the world size, so the same YAML runs on 1 GPU, 8 GPUs or
several nodes. Sharded checkpoints (one folder, a file per rank) are written to a temporary folder and renamed
when every rank has finished, so a crash mid-save leaves the previous checkpoint of that name loadable.
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy

from moxin_lightning.atomic import remove_stale_temporaries, staging_folder, swap_into_place
from moxin_lightning.checkpoint_io import CheckpointReadError, CheckpointWriteError, unreadable_checkpoint


class FSDP2(ModelParallelStrategy):
    """Fully sharded data parallelism (FSDP2 `fully_shard`, applied per block by the task's `configure_model`).

    Args:
        save_distributed_checkpoint: each rank saves its shard (a folder); False gathers one full file on rank 0.
        process_group_backend: `nccl` on GPUs, `gloo` on CPUs by default.
        timeout: collective timeout.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if self.is_global_zero:  # a save killed between its two renames left the previous checkpoint as .NAME.old-*
            remove_stale_temporaries(Path(checkpoint_path))
        self.barrier("stale checkpoint temporaries restored")
        try:
            return super().load_checkpoint(checkpoint_path, weights_only)
        except Exception as error:  # noqa: BLE001 - a single file torch.load refused: name it in one line
            if not Path(checkpoint_path).is_file() or isinstance(error, ValueError):
                raise
            raise CheckpointReadError(unreadable_checkpoint(checkpoint_path, error)) from error

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        output = Path(self.broadcast(str(filepath)))
        staging = None
        if self.is_global_zero:
            output.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(output)
            staging = staging_folder(output)
        staging = Path(self.broadcast(str(staging)))
        try:
            super().save_checkpoint(checkpoint, staging, storage_options)
        except Exception as error:  # torch's DCP raises on every rank when any rank's write fails
            if self.is_global_zero:
                shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointWriteError(f"could not write checkpoint {output}: {_reason(error)}") from None
        self.barrier("sharded checkpoint written")
        if self.is_global_zero:
            swap_into_place(staging, output)
        self.barrier("sharded checkpoint in place")


def _reason(error: BaseException) -> str:
    """The first line of what went wrong: an OSError's own words (errno text), else the error's first line."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
