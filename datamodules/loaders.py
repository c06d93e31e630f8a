"""`SplitLoaders`: the loaders of the epoch-based datamodules (chat, preference pairs, prompts).

Each holds map-style datasets per split in `self.datasets` once set up; training shuffles with `EpochShuffle` (a
new order each epoch from the seed, which Lightning's distributed sampler then splits between processes),
validation and test read the held-out split in order, and a datamodule without one validates nothing.
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
        return DataLoader(
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
