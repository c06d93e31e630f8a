"""One validation (or test) pass shared by every process: the batches of the one-process pass, each scored once.

What must hold on any number of processes: every process runs the same number of validation steps (a sharded
model's forward gathers its weights from all of them, and DDP and the metrics synchronise), and the reported
token-weighted loss is the one-process loss of the same batches.

How: every process makes the whole pass, the same list of N batches a single process makes (the datamodules read
the whole held-out split on every process: litdata's StreamingDataset hands each process its own chunks, and a
split of one chunk would leave every process but one with nothing). Process r of W scores batches r, r + W,
r + 2W, ...; one with fewer than ceil(N / W) of them scores padding batches until it has that many. A padding
batch is a real batch (the same shapes, so the same collectives) marked with `PADDING`: the task runs it and gives
it no weight (`TrainingTask` zeroes its loss and what it logs), so the sums over the processes are the
one-process sums.

Why not Lightning's DistributedSampler: it evens out the processes with repeated records that are then scored
twice, so the loss depends on the number of processes; and it applies to map-style DataLoaders only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

PADDING = "held_out_padding"  # the key marking a padding batch (True); real batches do not carry it


def is_padding(batch: Any) -> bool:
    """Whether `batch` only evens out the processes' validation steps and must weigh nothing."""
    return isinstance(batch, dict) and bool(batch.get(PADDING, False))


def padded(batch: dict[str, Any]) -> dict[str, Any]:
    """`batch` marked as padding (a shallow copy: the tensors are shared)."""
    return {**batch, PADDING: True}


def share(total: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """The batches of a pass of `total` that process `rank` of `world_size` runs, by their index in the pass, and
    how many of them, at the end, are padding: repeats of its last batch (of batch 0 when it has none)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not a process of {world_size}")
    mine = list(range(rank, total, world_size))
    padding = -(-total // world_size) - len(mine)
    return mine + [mine[-1] if mine else 0] * padding, padding


def process_place(trainer: Any = None) -> tuple[int, int]:
    """(rank, world size) of this process: the trainer's when there is one, else the process group's, else (0, 1)."""
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    import torch  # here: importing moxin_lightning.data stays cheap

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class Share:
    """One process's share of a pass as a re-iterable with a length (Lightning reads it as one loader): the batches
    `batches` yields, the last `padding` of them marked as padding. `batches` is re-iterated on every pass (a
    DataLoader over the share's records, or a list)."""

    def __init__(self, batches: Iterable[dict[str, Any]], length: int, padding: int) -> None:
        if not 0 <= padding <= length:
            raise ValueError(f"{padding} padding batches in a share of {length}")
        self.batches, self.length, self.padding = batches, length, padding

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index, batch in enumerate(self.batches):
            yield padded(batch) if index >= self.length - self.padding else batch
