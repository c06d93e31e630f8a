"""`RecordData`: what ChatData, PreferenceData and PromptData share — prepared folders streamed with litdata.

Every split is a folder `prepare --format chat|preference|prompts` wrote (`moxin_lightning.data.prepare_records`):
  * `train: [DIR]` names a prepared folder (local or an object-store URL); its `val/` split, when it has one, is
    the validation data;
  * `train: [files, globs, built-in corpora]` names raw records: they are prepared on first use, with this
    datamodule's settings, into `$MOXIN_CACHE/records/` (keyed by the inputs' paths, sizes and modification
    times, the tokenizer, the template and the settings), through exactly the code `prepare` runs, holding out
    `val_fraction` of them; later runs and sweep trials reuse the folder;
  * `val: [...]` names validation records the same way (a prepared folder's `val/` split, or the whole folder when
    it has none).

Training streams the items with litdata: `StreamingDataset` splits them across processes and loader workers (each
process gets as many), reshuffles every epoch from (seed, epoch), and `StreamingDataLoader` carries the position
within the epoch, which Lightning saves in the checkpoint, so a run resumed mid-epoch continues with the batches
it would have had. Validation reads the held-out items in order through a map-style view and makes the batches one
process would make; with several processes, each scores its share of them, padded to as many as the others
(`moxin_lightning.data.held_out`), so the validation loss is the one-process loss on any number of processes
(Lightning's distributed sampler would repeat records to even the processes out, and score them twice). Every item
carries `index`, its position in its split, which DPO's reference cache and GRPO's logs key on.

Before any work, `setup` refuses a prepared folder of another format, made with another tokenizer or template,
or prepared at another `max_length` (the items were cut there), and a model that cannot take the data.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.sampler import ChunkedIndex
from torch.utils.data import DataLoader, Dataset

import moxin_lightning
from moxin_lightning.data import manifest as manifests
from moxin_lightning.data import remote  # remote: litdata's chunk downloads over http:// too
from moxin_lightning.data.held_out import Share, process_place, share
from moxin_lightning.data.integrity import check_dataset, check_ids
from moxin_lightning.data.prepare import TOKENIZER_FOLDER, prepare
from moxin_lightning.data.prepare_records import RECORD_LAYOUT, plan_units
from moxin_lightning.data.records import BUILTIN_PREFIXES, RecordFormat, reasons, skip_summary, template_fingerprint
from moxin_lightning.first_use import build_once, cached_folder
from moxin_lightning.tokenizers import Tokenizer, load_tokenizer
from moxin_lightning.tokenizers.chat import TULU, ChatTemplate


class IndexedDataset(StreamingDataset):
    """litdata's StreamingDataset whose items carry `index`: their position in the split, whatever the order in
    which they are read (shuffled, split across processes and workers)."""

    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        position = index.index if isinstance(index, ChunkedIndex) else index
        return {**item, "index": int(position)}


class EpochStream(StreamingDataLoader):
    """litdata's StreamingDataLoader, resumed correctly under Lightning.

    After `load_state_dict`, litdata continues the loaded epoch and keeps doing so on every `__iter__` until one
    iteration runs to its end. Lightning stops an epoch after `len(loader)` batches without draining the
    iterator, so the next epoch would replay the tail of the resumed one. Only the first iteration after a load
    resumes here; later ones start a new epoch, as in the uninterrupted run (tested)."""

    _resuming_epoch_started = False

    def __iter__(self) -> Any:
        if self._resuming_epoch_started:
            self.restore = False
        self._resuming_epoch_started = bool(self.restore)
        return super().__iter__()


class IdsChecked:
    """A collate function that first checks every integer array of every item (ids, prompt, chosen, ...) to hold
    ids within the vocabulary, naming the dataset and the record, so corrupted data is one line, not an IndexError
    in the embedding (flags such as `trained` are 0/1 and pass)."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], Any], vocab_size: int, dataset: str, split: str):
        self.collate, self.vocab_size, self.dataset, self.split = collate, vocab_size, dataset, split

    def __call__(self, items: list[dict[str, Any]]) -> Any:
        for item in items:
            for key, value in item.items():
                ids = value if isinstance(value, np.ndarray) else None
                if ids is not None and ids.dtype.kind in "iu":
                    where = f"{self.split} record {item.get('index', '?')} ({key})"
                    check_ids(ids, self.vocab_size, self.dataset, where)
        return self.collate(items)


class Positions(Dataset):
    """A map-style view of chosen positions of a prepared split (validation, ordered scoring)."""

    def __init__(self, dataset: IndexedDataset, positions: list[int] | None = None) -> None:
        self.dataset = dataset
        self.positions = list(range(len(dataset))) if positions is None else positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.positions[index]]


class RecordData(L.LightningDataModule, ABC):
    """Base of the instruction datamodules. A subclass sets `format_name` and `usable`, implements `record_format`
    (the `RecordFormat` its settings make), `collate` and, if it has settings beyond the template, `_check_settings`.

    Args (shared):
        train: one prepared folder, or raw record files / globs / folders / URLs / built-in corpora.
        val: the same for validation; None: the prepared folder's held-out split, or `val_fraction` of raw `train`.
        val_fraction: share of raw `train` records held out (by a hash of their content); for a prepared folder,
            0 (take its split as prepared) or the fraction it was prepared with.
        tokenizer: the model's tokenizer; None: the one saved in the prepared folder.
        template: lays conversations out as tokens (default: Tülu's); must be the one the data was prepared with.
        batch_size: records per batch, per process.
        shuffle: a new order each epoch, drawn from (seed, epoch).
        seed: shuffling seed.
        num_workers: loader worker processes.
        max_seq_len, vocab_size: limits to check against; taken from the task's `model_config` when attached.
    """

    format_name: ClassVar[str]
    usable: ClassVar[str]  # what one usable record is called in messages ("trainable conversation", ...)

    def __init__(
        self,
        train: list[str],
        val: list[str] | None = None,
        val_fraction: float = 0.0,
        tokenizer: Tokenizer | None = None,
        template: ChatTemplate = TULU,
        batch_size: int = 8,
        shuffle: bool = True,
        seed: int = 42,
        num_workers: int = 0,
        max_seq_len: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if isinstance(train, str):
            train = [train]
        if not train:
            raise ValueError(f"{owner} needs at least one prepared folder, file, glob or built-in corpus in `train`")
        if val is not None and val_fraction > 0:
            raise ValueError(f"set either val files or val_fraction={val_fraction}, not both")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.train_files = [str(entry) for entry in train]
        self.val_files = None if val is None else [str(entry) for entry in val]
        self.val_fraction = val_fraction
        self._tokenizer, self.template = tokenizer, template
        self.batch_size, self.shuffle, self.seed, self.num_workers = batch_size, shuffle, seed, num_workers
        self.max_seq_len, self.vocab_size = max_seq_len, vocab_size
        self.manifests: list[dict[str, Any]] = []  # read by CheckpointPromotion for the release's data card
        self.datasets: list[str] = []  # the prepared folders, in the order of `manifests`
        self.streams: dict[str, IndexedDataset] = {}  # split -> its items
        self._sources: dict[str, tuple[str, str]] = {}  # split -> (prepared folder, split folder inside it)
        self._read: dict[str, dict[str, Any]] = {}  # prepared folder -> its manifest, read once

    def _manifest(self, folder: str) -> dict[str, Any]:
        if folder not in self._read:
            self._read[folder] = manifests.read(folder)
        return self._read[folder]

    def _prepared_setting(self, key: str) -> Any:
        """A setting of the prepared `train` folder (None for raw records): the default of a setting left unset."""
        if len(self.train_files) == 1 and _is_prepared(self.train_files[0]):
            return self._manifest(self.train_files[0]).get("records", {}).get(key)
        return None

    # -- what subclasses define ----------------------------------------------------------------------------

    @abstractmethod
    def record_format(self, tokenizer: Tokenizer) -> RecordFormat:
        """The format, with this datamodule's settings, that prepares and checks its records."""

    @abstractmethod
    def collate(self) -> Callable[[list[dict[str, Any]]], Any]:
        """Items -> a batch of the task's keys."""

    def sequence_length(self) -> int:
        """The longest sequence a batch can hold (checked against the model's max_seq_len)."""
        return 0

    # -- the tokenizer -------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        """The configured tokenizer, else the one saved in the prepared `train` folder."""
        if self._tokenizer is None:
            folder = self.train_files[0]
            if len(self.train_files) != 1 or not _is_prepared(folder):
                raise ValueError(
                    f"{type(self).__name__} needs the model's tokenizer for raw records: set data.tokenizer "
                    "(e.g. a LocalTokenizer), or name a prepared folder, which carries its own"
                )
            saved: Path | None = Path(folder) / TOKENIZER_FOLDER
            if remote.is_remote(folder):
                version = self._manifest(folder)["tokenizer"]["fingerprint"]
                saved = remote.cached_copy(_join(folder, TOKENIZER_FOLDER), version)
            if saved is None or not saved.is_dir():
                raise ValueError(f"{folder} carries no {TOKENIZER_FOLDER}/ folder; set data.tokenizer")
            self._tokenizer = load_tokenizer(saved)
        return self._tokenizer

    # -- preparing raw records on first use ----------------------------------------------------------------

    def _plan(self) -> dict[str, tuple[str, str]]:
        """split -> (prepared folder, split folder inside it); raw inputs map to their cache folder."""
        if self._sources:
            return self._sources
        train = self._folder_for(self.train_files, self.val_fraction, "train")
        sources = {"train": (train, "train")}
        if self.val_files is not None:
            val = self._folder_for(self.val_files, 0.0, "val")
            has_val = _is_prepared(val) and "val" in self._manifest(val).get("splits", {})
            sources["val"] = (val, "val" if has_val else "train")
        elif self.val_fraction > 0 or (_is_prepared(train) and "val" in self._manifest(train).get("splits", {})):
            sources["val"] = (train, "val")
        self._sources = sources
        return sources

    def _folder_for(self, entries: list[str], val_fraction: float, role: str) -> str:
        prepared = [entry for entry in entries if _is_prepared(entry)]
        if prepared:
            if len(entries) != 1:
                raise ValueError(
                    f"{role} lists {len(entries)} inputs of which {prepared[0]} is a prepared folder; name one "
                    "prepared folder, or prepare all inputs together (prepare takes several --input)"
                )
            return prepared[0]
        record_format = self.record_format(self.tokenizer)
        units = plan_units(record_format, entries)
        identity = {
            "units": [_identity(unit) for unit in units],
            "records": record_format.describe(),
            "tokenizer": self.tokenizer.fingerprint,
            "val_fraction": val_fraction,
            "moxin_lightning": moxin_lightning.__version__,
        }
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return str(cached_folder("records", f"{self.format_name}-{key[:20]}"))

    def prepare_data(self) -> None:
        """Prepare raw `train` / `val` records not prepared yet (Lightning calls this on one process per node)."""
        raw = {"train": (self.train_files, self.val_fraction)}
        if self.val_files is not None:
            raw["val"] = (self.val_files, 0.0)
        for split, (folder, _) in self._plan().items():
            if split not in raw or _is_prepared(raw[split][0][0]):
                continue
            inputs, fraction = raw[split]
            build_once(Path(folder), lambda f: (f / manifests.MANIFEST).is_file(), self._preparer(inputs, fraction))

    def _preparer(self, inputs: list[str], val_fraction: float) -> Callable[[Path], object]:
        def build(folder: Path) -> object:
            rank_zero_info(f"{type(self).__name__}: preparing {inputs} on first use into {folder}")
            fmt = self.record_format(self.tokenizer)
            settings = fmt.settings()
            return prepare(
                inputs,
                self.tokenizer,
                folder,
                val_fraction=val_fraction,
                num_workers=min(_available_cpus(), 4),
                format=self.format_name,
                template=self.template,
                **settings,
            )

        return build

    # -- setup ---------------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        self._model_limits(self._attached_model_config())
        if self.streams:
            return
        self.prepare_data()  # a no-op when Lightning already ran it (or the folders are prepared)
        for split, (folder, inside) in self._checked_plan().items():
            self.streams[split] = IndexedDataset(
                _join(folder, inside), shuffle=self.shuffle and split == "train", seed=self.seed
            )
        rank_zero_info(self.summary())

    def check_before_start(self, model_config: Any) -> None:
        """Everything `setup` refuses, before any logger or model starts (`moxin_lightning.preflight`): raw
        records are prepared on first use, then the folders are checked against this run and the model's limits.
        No stream is opened: the processes of a distributed run are not connected yet."""
        self._model_limits(model_config)
        self.prepare_data()
        self._checked_plan()

    def _checked_plan(self) -> dict[str, tuple[str, str]]:
        """The split plan, every folder's manifest checked against the run (and recorded), every split usable."""
        self.manifests, self.datasets = [], []
        plan = self._plan()
        for split, (folder, inside) in plan.items():
            data = self._checked_manifest(folder)
            if folder not in self.datasets:
                self.datasets.append(folder)
                self.manifests.append(data)
                check_dataset(folder, data)  # counts, chunk files and their sizes against the manifest
            if not data["splits"].get(inside, {}).get("records"):
                raise ValueError(self._nothing_usable(split, data, inside))
        return plan

    def _checked_manifest(self, folder: str) -> dict[str, Any]:
        """The prepared folder's manifest, refused (one line) when it does not fit this run."""
        data = self._manifest(folder)
        owner = type(self).__name__
        records = data.get("records") or {}
        if data.get("layout") != RECORD_LAYOUT or records.get("format") != self.format_name:
            made = records.get("format") or f"documents (layout {data.get('layout', 'documents')})"
            raise ValueError(f"{folder} holds {made} data; {owner} reads prepare --format {self.format_name} folders")
        if data["tokenizer"]["fingerprint"] != self.tokenizer.fingerprint:
            raise ValueError(
                f"{folder} was prepared with tokenizer {data['tokenizer']['fingerprint'][:12]} but data.tokenizer is "
                f"{self.tokenizer.fingerprint[:12]}; prepare it again with this tokenizer, or drop data.tokenizer"
            )
        template = records.get("template", {})
        if template.get("fingerprint") != template_fingerprint(self.template):
            raise ValueError(
                f"{folder} was prepared with chat template {template.get('name')!r} (fingerprint "
                f"{str(template.get('fingerprint'))[:12]}), not this run's {self.template.name!r} "
                f"({template_fingerprint(self.template)[:12]}); prepare it again with --template"
            )
        prepared_fraction = data.get("split", {}).get("val_fraction", 0)
        if self.val_fraction > 0 and _is_prepared(self.train_files[0]) and self.val_fraction != prepared_fraction:
            raise ValueError(
                f"{folder} was prepared with val_fraction {prepared_fraction}, not {self.val_fraction}; set "
                "data.val_fraction to 0 to use its split, or prepare it again with --val_fraction"
            )
        self._check_settings(folder, records)
        return data

    def _check_settings(self, folder: str, records: dict[str, Any]) -> None:
        """Refuse a folder prepared with other format settings (subclasses: max_length, instruction, ...)."""

    def _check_setting(self, folder: str, records: dict[str, Any], key: str, value: Any, flag: str) -> None:
        prepared = records.get(key)
        if prepared == value:
            return
        if isinstance(value, int) and isinstance(prepared, int) and value > prepared:
            raise ValueError(
                f"{key}={value} is above the {prepared} {folder} was prepared with: its records were cut or "
                f"skipped at {prepared}; prepare it again with --{flag} {value}, or set {key}={prepared}"
            )
        raise ValueError(
            f"{key}={value!r} differs from the {prepared!r} {folder} was prepared with; prepare it again with "
            f"--{flag} {value}, or set {key}={prepared!r}"
        )

    def _attached_model_config(self) -> Any:
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        return getattr(module, "model_config", None)

    def _model_limits(self, config: Any) -> None:
        """Take the model's limits from its config (when known); refuse a model the data cannot feed."""
        if config is not None:
            self.max_seq_len = self.max_seq_len or config.max_seq_len
            self.vocab_size = self.vocab_size or config.vocab_size
        length = self.sequence_length()
        if self.max_seq_len is not None and length > self.max_seq_len:
            raise ValueError(
                f"max_length={length} exceeds the model's max_seq_len={self.max_seq_len}; lower max_length"
            )
        if self.vocab_size is not None and self.tokenizer.vocab_size > self.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{self.vocab_size}; use the model's tokenizer"
            )

    def _nothing_usable(self, split: str, data: dict[str, Any], inside: str) -> str:
        entry = data["splits"].get(inside, {})
        source = self.train_files if split == "train" or self.val_files is None else self.val_files
        if split == "val" and self.val_files is None:
            where = f"the val_fraction={data.get('split', {}).get('val_fraction')} share of {source}"
        else:
            where = str(source)
        return (
            f"no {self.usable} in {split} data {where} (skipped: {reasons(entry.get('skipped', {})) or 'no records'})"
            f"; check the records or the length settings"
        )

    # -- what the data holds -------------------------------------------------------------------------------

    def split_entry(self, split: str) -> dict[str, Any]:
        """The manifest's entry of a split: records, tokens, trained tokens, truncated, skipped by reason."""
        if not self.streams:
            self.setup()
        folder, inside = self._plan()[split]
        return self._manifest(folder)["splits"][inside]

    @property
    def skipped(self) -> dict[str, dict[str, int]]:
        """Skipped records per split ('train', 'val') and reason, as prepared."""
        return {split: dict(self.split_entry(split).get("skipped", {})) for split in self._plan()}

    def summary(self) -> str:
        """One line: what each split holds and what was skipped, and why."""
        parts = []
        for split in self.streams:
            entry = self.split_entry(split)
            parts.append(
                f"{split}: {entry['records']} records ({entry['truncated']} truncated), {entry['tokens']} tokens "
                f"({entry['trained_tokens']} trained); {skip_summary(entry.get('skipped', {}))}"
            )
        return f"{type(self).__name__} ({self.template.name} template) " + "; ".join(parts)

    def count(self, split: str = "train") -> int:
        """Records in a split (all processes together)."""
        if not self.streams:
            self.setup()
        return len(Positions(self.streams[split]))

    def split_fingerprint(self, split: str) -> str:
        """Identifies a split's items: its prepared folder's fingerprint (tokens, template, settings, tokenizer)
        and the split's name."""
        folder, inside = self._plan()[split]
        return hashlib.sha256(f"{self._manifest(folder)['fingerprint']}|{inside}".encode()).hexdigest()

    @property
    def fingerprint(self) -> str:
        return self.split_fingerprint("train")

    # -- loaders -------------------------------------------------------------------------------------------

    def train_dataloader(self) -> EpochStream:
        if not self.streams:
            self.setup()
        return EpochStream(
            self.streams["train"],
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=self._checked_collate("train"),
        )

    def _checked_collate(self, split: str) -> IdsChecked:
        return IdsChecked(self.collate(), self.tokenizer.vocab_size, self._plan()[split][0], split)

    def val_dataloader(self) -> Share | list:
        """This process's share of the held-out split's batches (see `held_out`); no validation (an empty list)
        without a held-out split."""
        if not self.streams:
            self.setup()
        if "val" not in self.streams:
            return []
        return self.held_out("val", *process_place(self.trainer))

    def test_dataloader(self) -> Share | list:
        return self.val_dataloader()

    def held_out(self, split: str = "val", rank: int = 0, world_size: int = 1) -> Share:
        """Process `rank`'s share of a split's batches in order: the split cut into batches of `batch_size` records
        as one process cuts it, of which it takes batches rank, rank + world_size, ..., then padding batches (marked,
        weighing nothing) until it has as many as process 0, so every process runs as many steps."""
        if not self.streams:
            self.setup()
        records = len(Positions(self.streams[split]))
        batches = -(-records // self.batch_size)
        indices, padding = share(batches, rank, world_size)
        size = self.batch_size
        rows = [list(range(index * size, min(records, (index + 1) * size))) for index in indices]
        loader = DataLoader(
            Positions(self.streams[split]),
            batch_sampler=rows,
            collate_fn=self._checked_collate(split),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
        return Share(loader, len(rows), padding)

    def ordered_dataloader(self, split: str = "train", rank: int = 0, world_size: int = 1) -> DataLoader:
        """A split's records in index order, not shuffled (e.g. to fill a reference-log-prob cache); with
        `world_size` > 1, process `rank`'s share: a contiguous block (chunk-friendly on object stores), the last
        record repeated so that every process runs as many batches (sharded models need all processes in each
        forward)."""
        if not self.streams:
            self.setup()
        total = len(Positions(self.streams[split]))
        per_rank = -(-total // world_size)
        share = list(range(rank * per_rank, min(total, (rank + 1) * per_rank))) or [total - 1]
        share += share[-1:] * (per_rank - len(share))
        return self._ordered(Positions(self.streams[split], share), split)

    def _ordered(self, dataset: Dataset, split: str) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=self._checked_collate(split),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


# -------------------------------------------------------------------------------------------------- helpers


def _is_prepared(entry: str) -> bool:
    """Whether an input names a prepared folder (it has a manifest.json), local or at an object-store URL."""
    if not remote.is_remote(entry):
        return (Path(entry) / manifests.MANIFEST).is_file()
    if entry.rstrip("/").rsplit("/", 1)[-1].count(".") or any(ch in entry for ch in "*?["):
        return False  # a file or a glob of files
    try:
        manifests.read(entry)
    except (FileNotFoundError, OSError, ValueError):
        return False
    return True


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}" if remote.is_remote(folder) else str(Path(folder) / name)


def _identity(unit: str) -> Any:
    """What the cache key of raw records knows about one input: a local file's path, size and modification time;
    an object's URL, size and etag or modification time; a built-in corpus's name, the Python it comes from and
    the source of the code that generates it (an edited generator makes new records, never reuses stale ones)."""
    if unit.startswith(BUILTIN_PREFIXES):
        return [unit, sys.version, _builtin_generators_digest()]
    if "://" not in unit:
        stat = os.stat(unit)
        return [os.path.abspath(unit), stat.st_size, stat.st_mtime_ns]
    import fsspec

    fs, path = fsspec.core.url_to_fs(unit)
    info = fs.info(path)
    return [unit, info.get("size"), str(info.get("ETag") or info.get("etag") or info.get("LastModified") or "")]


@functools.cache
def _builtin_generators_digest() -> str:
    """sha256 of the modules that write the built-in chat, pair and prompt records."""
    from moxin_lightning.data import builtin_chat, chat_records, preference_records, prompt_records

    digest = hashlib.sha256()
    for module in (builtin_chat, chat_records, preference_records, prompt_records):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1
