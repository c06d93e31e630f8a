"""`SplitLoaders`: the loaders of the epoch-based datamodules (chat, preference pairs, prompts).

Each holds map-style datasets per split in `self.datasets` once set up; training shuffles with `EpochShuffle` (a
new order each epoch from the seed, which Lightning's distributed sampler then splits between processes),
validation and test read the held-out split in order, and a datamodule without one validates nothing. The
training loader is a `ResumableDataLoader`, so a run resumed from a mid-epoch checkpoint continues that epoch
where it stopped instead of starting it over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.pretrain import FixedBatches


class EpochShuffle(Sampler[int]):
    """Row order of one epoch: a permutation drawn from (seed, epoch), the same on every process.

    Lightning calls `set_epoch` each epoch, and with several processes wraps this sampler in its distributed
    sampler, which gives process r every world_size-th index of this order."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning checkpoints mid-epoch: its state is the batches handed out this epoch.

    Lightning saves `state_dict()` of a loader that has one with the fit loop, and calls `load_state_dict` on
    resume; the next epoch iterated (the same epoch: Lightning restores the epoch and sets it on the sampler, so
    the order is the same) then skips the batches already trained on. The skipped batches are still built (the
    datasets are in memory, so that is cheap) rather than cut from the sampler, which under DDP is Lightning's
    distributed wrapper. A sized loader is not prefetched by Lightning, so the count is exactly the batches
    trained when the checkpoint is written. A subclass, not a wrapper: Lightning re-creates DataLoaders to insert
    its distributed sampler."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0  # batches handed out in the current epoch
        self._epoch: int | None = None
        self._resume: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        epoch = getattr(self.sampler, "epoch", None)
        skip = 0
        if self._resume is not None and self._resume["epoch"] == epoch and self._resume["batches"] < len(self):
            skip = self._resume["batches"]
        self._resume, self._served, self._epoch = None, 0, epoch
        for index, batch in enumerate(super().__iter__()):
            self._served += 1
            if index >= skip:
                yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)


class SplitLoaders:
    """Mixin for a LightningDataModule with `datasets`, `batch_size`, `shuffle`, `seed`, `num_workers` and a
    `collate` method giving its batch collate function."""

    datasets: dict[str, Any]
    batch_size: int
    shuffle: bool
    seed: int
    num_workers: int

    def collate(self) -> Callable[[list[Any]], Any]:
        raise TypeError(f"{type(self).__name__} defines no collate()")

    def _dataset(self, split: str) -> Any:
        if not self.datasets:
            self.setup()
        return self.datasets[split]

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffle(len(dataset), self.seed) if shuffle else None,
            collate_fn=self.collate(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("train"), self.shuffle)

    def val_dataloader(self) -> DataLoader | FixedBatches:
        """The held-out split in order; no validation (an empty loader) without `val` or `val_fraction`."""
        if not self.datasets:
            self.setup()
        if "val" not in self.datasets:
            return FixedBatches([])
        return self._loader(self.datasets["val"], shuffle=False)

    def test_dataloader(self) -> DataLoader | FixedBatches:
        return self.val_dataloader()
