"""What a `prepare --format chat|preference|prompts` worker does with one unit of work (one file or built-in
corpus): read its records, parse them, pick their split, encode them in batches, hand training items to litdata.

The split of a record is a pure function of its content and the seed (`records.held_out`), so every worker
decides it alone; when the rule would hold out none, the `forced` hash picked before the work (`worker.scan_split`)
is held out instead. Validation items (a small share) are pickled to `val_dir/<unit>.pkl` and written as the val
split afterwards (`ValItems`), in unit order, without reading or encoding anything again. Each split's items are
hashed as they are made (`item_digest`), per unit; the manifest's split digest is the sha256 of the units'
digests in unit order, so it pins every item without reading the shards back.

Reports and failures work as in `worker.py` (small JSON files per unit; an `.error` report and a `failed` flag,
and the worker returns instead of raising, which litdata 0.2.76 would turn into an orphaned helper process).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moxin_lightning.data.records import Encoded, RecordFormat, SplitCounts, held_out
from moxin_lightning.data.worker import _write_atomic, failed, report_failure

BATCH_RECORDS = 512  # records encoded per tokenizer call: enough for sentencepiece's loop, small in memory


def item_digest(digest: Any, item: dict[str, Any]) -> None:
    """Feed one item into `digest`: every field by name, arrays as dtype, length and little-endian bytes, strings
    as their UTF-8 length and bytes, so two items hash alike only when they are equal."""
    for key in sorted(item):
        value = item[key]
        digest.update(key.encode() + b"\0")
        if isinstance(value, np.ndarray):
            data = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
            digest.update(f"{value.dtype.str}:{value.size}:".encode() + data)
        else:
            data = str(value).encode("utf-8", "surrogatepass")
            digest.update(f"str:{len(data)}:".encode() + data)


@dataclass
class EncodeRecords:
    """The function litdata runs in each worker: unit index -> the unit's training items, in record order."""

    units: list[str]
    format: RecordFormat
    val_fraction: float
    seed: int
    stats_dir: Path
    val_dir: Path
    forced: int | None = None  # the split hash held out when the rule picks no record (`worker.scan_split`)

    def __call__(self, unit: int) -> Iterator[dict[str, Any]]:
        if failed(self.stats_dir):
            return
        counts = {"train": SplitCounts(), "val": SplitCounts()}
        digests = {"train": hashlib.sha256(), "val": hashlib.sha256()}
        val: list[dict[str, Any]] = []
        batch: list[tuple[str, Any, str]] = []  # (where, parsed record or the reason it is skipped, split)
        read = 0
        try:
            for record in self.format.read(self.units[unit]):
                read += 1
                parsed = record.skip if record.value is None else self.format.parse(record.value)
                if isinstance(parsed, str):  # unusable before any split is known: counted with train
                    batch.append((record.where, parsed or "unreadable record", "train"))
                else:
                    held = held_out(self.format.split_key(parsed), self.val_fraction, self.seed, self.forced)
                    batch.append((record.where, parsed, "val" if held else "train"))
                if len(batch) >= BATCH_RECORDS:
                    yield from self._encode(batch, counts, digests, val)
                    self._report(unit, read, counts, digests, done=False)
                    batch = []
                    if failed(self.stats_dir):
                        return
            yield from self._encode(batch, counts, digests, val)
            if val:
                with open(self.val_dir / f"{unit:06d}.pkl", "wb") as file:
                    pickle.dump(val, file, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:
            self._fail(unit, batch, error)
            return
        self._report(unit, read, counts, digests, done=True)

    def _encode(
        self, batch: list[tuple[str, Any, str]], counts: dict, digests: dict, val: list[dict[str, Any]]
    ) -> Iterator[dict[str, Any]]:
        if not batch:
            return
        usable = [parsed for _, parsed, _ in batch if not isinstance(parsed, str)]
        encoded = iter(self.format.encode_parsed(usable) if usable else [])
        for where, parsed, split in batch:  # skips are counted in record order, whether parsing or encoding found them
            result = parsed if isinstance(parsed, str) else next(encoded)
            if isinstance(result, str):
                counts[split].skip(where, result)
                continue
            assert isinstance(result, Encoded)
            tally = counts[split]
            tally.records += 1
            tally.tokens += result.tokens
            tally.trained_tokens += result.trained_tokens
            tally.truncated += result.truncated
            item_digest(digests[split], result.item)
            if split == "val":
                val.append(result.item)
            else:
                yield result.item

    def _report(self, unit: int, read: int, counts: dict, digests: dict, *, done: bool) -> None:
        report = {
            "unit": unit,
            "done": done,
            "input": self.units[unit],
            "read": read,
            **{split: {**counts[split].to_dict(), "sha256": digests[split].hexdigest()} for split in counts},
        }
        _write_atomic(self.stats_dir / f"{unit:06d}.json", json.dumps(report))

    def _fail(self, unit: int, batch: list[tuple[str, Any, str]], error: Exception) -> None:
        where = f"{batch[0][0]} .. {batch[-1][0]}" if batch else self.units[unit]
        report_failure(self.stats_dir, unit, f"encoding {where}", error)


@dataclass
class ValItems:
    """The function litdata runs to write the val split: unit -> the unit's saved items, in order (none when it
    saved none). Indexed by unit, so a multi-node run maps each unit to the node that encoded it."""

    val_dir: Path

    def __call__(self, unit: int) -> Iterator[dict[str, Any]]:
        path = self.val_dir / f"{unit:06d}.pkl"
        if not path.is_file():
            return
        with open(path, "rb") as file:
            yield from pickle.load(file)  # our own workers' temporary files, never user input
