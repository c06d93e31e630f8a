"""`PretrainData`: stream prepared token datasets with mixture weights, packed into `seq_len` rows.

Each prepared dataset (`python -m moxin_lightning prepare`) is read document by document with litdata's
`StreamingDataset` and `StreamingDataLoader` (workers, shuffling, exact mid-epoch state). The mixture is
drawn here, in the main process: read k takes the next documents from dataset i chosen by a generator
seeded with (seed, k), so the whole stream is a function of its position, and a checkpoint holds the
position of every loader, the number of reads and the unpacked tokens. litdata's own
`CombinedStreamingDataset` does the same sampling but, measured with 2 workers, does not resume to the same
documents, which exact resume needs.

Pretraining is one long streaming epoch bounded by the trainer's `max_steps`: a dataset that runs out
starts its next pass (reshuffled) without ending the epoch.

Validation is the same pass on any number of processes: every process reads the held-out splits whole, in order
(random access, which does not depend on the process group), and scores its share of the pass's batches
(`moxin_lightning.data.held_out`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset

from moxin_lightning.data import manifest, remote  # remote: litdata's chunk downloads over http:// too
from moxin_lightning.data.builtin import cache_key
from moxin_lightning.data.held_out import padded, process_place, share
from moxin_lightning.data.integrity import check_dataset, check_ids, verify_dataset
from moxin_lightning.data.prepare import TOKENIZER_FOLDER, prepare
from moxin_lightning.datamodules.packing import TokenPacker
from moxin_lightning.first_use import build_once, cached_folder
from moxin_lightning.tokenizers import Tokenizer, load_tokenizer

BUILTIN = "builtin:"  # a dataset entry naming a built-in corpus (see moxin_lightning.data.builtin)
# Held-out share of a built-in corpus prepared on first use. The corpus is drawn from the installed packages, so
# its documents vary between environments; `prepare`'s default (0.5%) can leave a few-MB corpus with one short
# document held out, less than one validation batch. 2% holds out ~1/50 of the tokens (tens of thousands).
BUILTIN_VAL_FRACTION = 0.02


def _keep_list(items: list[Any]) -> list[Any]:
    """Collate function: documents differ in length, so a batch stays a list."""
    return items


class CheckedDocuments(StreamingDataset):
    """litdata's StreamingDataset whose documents are checked to hold ids within the vocabulary as they are read
    (in the loader's workers too), so corrupted ids stop the run in one line naming the dataset and the chunk
    instead of an IndexError in the embedding."""

    def __init__(self, input_dir: str, *, dataset: str, vocab_size: int, **kwargs: Any) -> None:
        super().__init__(input_dir, **kwargs)
        self.dataset, self.vocab_size = dataset, vocab_size

    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        ids = np.asarray(item)
        if ids.size and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
            split = Path(str(self.input_dir.path or self.input_dir.url)).name
            chunk_index = getattr(index, "chunk_index", None)
            try:
                if chunk_index is None:  # read by position (the held-out splits): find its chunk
                    chunk_index = self.cache._get_chunk_index_from_index(int(index))[1]
                chunk = self.cache._reader.config._chunks[chunk_index]["filename"]
            except (AttributeError, IndexError, KeyError, TypeError):
                chunk = "a chunk"
            position = getattr(index, "index", index)
            check_ids(ids, self.vocab_size, self.dataset, f"{split}/{chunk} (document {position})")
        return item


def streamable_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a prepared dataset folder; one-line errors when it is missing, empty or not streamable."""
    data = manifest.read(path)
    if not data.get("splits", {}).get("train", {}).get("tokens"):
        raise ValueError(f"prepared dataset {path} is empty; re-run prepare on non-empty inputs")
    if data.get("layout", "documents") != "documents":
        raise ValueError(f"{path} was prepared with --layout {data['layout']}; PretrainData streams --layout documents")
    return data


class PretrainData(L.LightningDataModule):
    """Batches {input_ids, labels, doc_ids} of shape (batch_size, seq_len) from one or more prepared datasets.

    Args:
        datasets: prepared dataset folders (the `--output` of `prepare`), local or object-store URLs
            (`s3://bucket/data/c1`, streamed by litdata). An entry `builtin:...` (e.g. `builtin:local?max_mb=3`)
            is a built-in corpus, prepared with `tokenizer` on first use and cached (`$MOXIN_CACHE`).
        tokenizer: the tokenizer of the data. None: the one `prepare` saved beside the data. When given, the
            data must have been made with it (same fingerprint); a release (CheckpointPromotion) ships it.
        weights: mixture weights, one per dataset (normalised; default equal).
        seq_len: tokens per row; `set_seq_len` changes it mid-run with the token stream continuing.
        batch_size: rows per batch (per device).
        num_workers: litdata reader processes per dataset.
        seed: shuffling and mixture seed.
        docs_per_read: documents taken from one dataset per mixture draw.
        val_batches: batches in one validation pass over the held-out splits, all processes together: the
            same batches on any number of processes, each process scoring its share.
        max_seq_len, vocab_size: limits to check against; taken from the task's `model_config` (a
            `ModelConfig`) when the datamodule is attached to a trainer.
        verify: re-hash every chunk of the local datasets against their manifests at setup (reads all the
            data once; `python -m moxin_lightning verify DATASET` does the same). Counts, chunk sizes and the
            presence of every chunk file are checked at setup anyway, and token ids as documents are read.
    """

    def __init__(
        self,
        datasets: list[str],
        tokenizer: Tokenizer | None = None,
        weights: list[float] | None = None,
        seq_len: int = 2048,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 42,
        shuffle: bool = True,
        docs_per_read: int = 64,
        val_batches: int = 20,
        max_seq_len: int | None = None,
        vocab_size: int | None = None,
        verify: bool = False,
    ) -> None:
        super().__init__()
        if not datasets:
            raise ValueError("PretrainData needs at least one prepared dataset folder in `datasets`")
        if weights is not None and (len(weights) != len(datasets) or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"weights {weights} must be {len(datasets)} non-negative numbers with a positive sum")
        self._tokenizer = tokenizer
        self.builtin = {str(d): self._cache_folder(str(d)) for d in datasets if str(d).startswith(BUILTIN)}
        self.datasets = [self.builtin.get(str(d), str(d)) for d in datasets]
        for path in self.datasets:
            if path not in self.builtin.values() and "://" not in path:
                streamable_manifest(path)  # a missing local dataset stops here, naming the prepare command
        self.weights = np.asarray(weights if weights is not None else [1.0] * len(datasets), dtype=np.float64)
        self.weights = self.weights / self.weights.sum()
        self.seq_len = seq_len
        self.batch_size = batch_size
        # validation keeps the configured shape: a fixed yardstick, also after context extension or a resume
        self.val_shape = (batch_size, seq_len)
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.docs_per_read = docs_per_read
        self.val_batches = val_batches
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.verify = verify
        self.manifests: list[dict[str, Any]] = []
        self._checked_before_start = False
        self._validation_pass: list[dict[str, torch.Tensor]] | None = None

    # -- data and tokenizer ------------------------------------------------------------------------------

    def _cache_folder(self, spec: str) -> str:
        if self._tokenizer is None:
            raise ValueError(f"dataset {spec} is prepared on first use and needs a `tokenizer`; set data.tokenizer")
        key = f"{cache_key(spec)}-val{BUILTIN_VAL_FRACTION}-{self._tokenizer.fingerprint[:16]}"
        return str(cached_folder("data", key))

    def prepare_data(self) -> None:
        """Prepare the built-in corpora not prepared yet (Lightning calls this on one process per node)."""
        for spec, folder in self.builtin.items():
            build_once(
                Path(folder),
                lambda f: (f / manifest.MANIFEST).is_file(),
                lambda f, spec=spec: prepare(
                    spec, self._tokenizer, f, val_fraction=BUILTIN_VAL_FRACTION, num_workers=1, progress=False
                ),
            )

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The configured tokenizer, or the one saved with the first dataset (from a remote dataset: downloaded
        once into $MOXIN_CACHE); None when the data carries none."""
        if self._tokenizer is None:
            first = self.datasets[0]
            saved: Path | None = Path(first) / TOKENIZER_FOLDER
            if remote.is_remote(first):
                version = self._read_manifests()[0]["tokenizer"]["fingerprint"]
                saved = remote.cached_copy(f"{first.rstrip('/')}/{TOKENIZER_FOLDER}", version)
            if saved is not None and saved.is_dir():
                self._tokenizer = load_tokenizer(saved)
        return self._tokenizer

    # -- checks -------------------------------------------------------------------------------------------

    def _read_manifests(self) -> list[dict[str, Any]]:
        """Each dataset's manifest, read once (setup, the fingerprint and validation all need them)."""
        if not self.manifests:
            self.manifests = [streamable_manifest(path) for path in self.datasets]
        return self.manifests

    def setup(self, stage: str | None = None) -> None:
        if not self._checked_before_start:  # the same checks, already passed: the index files are not read twice
            self._check(self._model_config())

    def check_before_start(self, model_config: Any) -> None:
        """Everything `setup` refuses, before any logger or model starts (`moxin_lightning.preflight`): built-in
        corpora are prepared on first use, then the datasets are checked against each other and the model, and the
        validation pass is made (from the whole held-out splits: one too small for a batch is refused here)."""
        self.prepare_data()
        self._check(model_config)
        self.validation_pass()
        self._checked_before_start = True

    def _check(self, model_config: Any) -> None:
        self._read_manifests()
        tokenizers = {m["tokenizer"]["fingerprint"] for m in self.manifests}
        if len(tokenizers) > 1:
            raise ValueError(f"datasets {self.datasets} were made with different tokenizers; prepare them with one")
        if self._tokenizer is not None and self._tokenizer.fingerprint not in tokenizers:
            raise ValueError(
                f"the datasets were prepared with tokenizer {tokenizers.pop()[:12]} but data.tokenizer is "
                f"{self._tokenizer.fingerprint[:12]}; prepare the data with this tokenizer or drop data.tokenizer"
            )
        if model_config is not None:
            self.max_seq_len = self.max_seq_len or model_config.max_seq_len
            self.vocab_size = self.vocab_size or model_config.vocab_size
        tokenizer_vocab = self.manifests[0]["tokenizer"]["vocab_size"]
        if self.vocab_size is not None and tokenizer_vocab > self.vocab_size:
            raise ValueError(
                f"the data's tokenizer has {tokenizer_vocab} tokens but the model's vocab_size is {self.vocab_size}; "
                "prepare the data with the model's tokenizer or resize the model"
            )
        self._check_seq_len(self.seq_len)
        for path, data in zip(self.datasets, self.manifests, strict=True):
            if self.verify and not remote.is_remote(path):  # content hashes: local data (`verify` reads it all)
                verify_dataset(path, data)
            else:  # counts, chunk files and their sizes against the manifest, on an object store too
                check_dataset(path, data)

    def _model_config(self) -> Any:
        trainer = self.trainer
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        return getattr(module, "model_config", None)

    def _check_seq_len(self, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        if self.max_seq_len is not None and seq_len > self.max_seq_len:
            raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={self.max_seq_len}; lower seq_len")

    @property
    def fingerprint(self) -> str:
        """Identifies the token stream: every dataset's fingerprint, the weights and the seed."""
        parts = [m["fingerprint"] for m in self._read_manifests()] + [
            repr(self.weights.round(12).tolist()),
            str(self.seed),
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    # -- phase-aware length -------------------------------------------------------------------------------

    def set_seq_len(self, seq_len: int, batch_size: int | None = None) -> None:
        """Rows from the next batch on have `seq_len` tokens (and `batch_size` rows, when given); the stream
        continues where it was, so a context-extension switch skips and repeats no token."""
        self._check_seq_len(seq_len)
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.seq_len = seq_len
        self.batch_size = batch_size or self.batch_size

    # -- loaders ------------------------------------------------------------------------------------------

    def _documents(self, path: str, split: str, shuffle: bool) -> CheckedDocuments:
        limit = self._read_manifests()[0]["tokenizer"]["vocab_size"]  # ids the data's tokenizer can make
        if self.vocab_size is not None:
            limit = min(limit, self.vocab_size)
        directory = _split_dir(path, split)
        return CheckedDocuments(directory, dataset=path, vocab_size=limit, shuffle=shuffle, seed=self.seed)

    def _loaders(self, split: str, shuffle: bool) -> list[StreamingDataLoader]:
        return [
            StreamingDataLoader(
                self._documents(path, split, shuffle),
                batch_size=self.docs_per_read,
                num_workers=self.num_workers,
                collate_fn=_keep_list,
            )
            for path in self.datasets
        ]

    def train_dataloader(self) -> PackedStream:
        return PackedStream(
            self._loaders("train", self.shuffle),
            self.weights,
            seed=self.seed,
            batch_size=lambda: self.batch_size,
            seq_len=lambda: self.seq_len,
            fingerprint=self.fingerprint,
            length=self._length_hint(),
        )

    def val_dataloader(self) -> FixedBatches:
        """This process's share of the validation pass (see `held_out`)."""
        return self.held_out(*process_place(self.trainer))

    def held_out(self, rank: int = 0, world_size: int = 1) -> FixedBatches:
        """Process `rank`'s share of the validation pass: its batches rank, rank + world_size, ..., then padding
        batches (marked, weighing nothing) until it has as many as process 0, so that every process runs the same
        number of validation steps (`moxin_lightning.data.held_out`). The token-weighted loss summed over the
        processes is then the one-process loss of the whole pass, on any number of processes."""
        indices, padding = share(len(self.validation_pass()), rank, world_size)
        batches = [self.validation_pass()[index] for index in indices]
        real = len(batches) - padding
        return FixedBatches(batches[:real] + [padded(batch) for batch in batches[real:]])

    def validation_pass(self) -> list[dict[str, torch.Tensor]]:
        """The first `val_batches` batches of the held-out splits: the same list every time and on every process.

        Every process reads the held-out splits whole, one document at a time in order (`HeldOutDocuments`): a
        litdata loader would give each process its own chunks only, so that with a small split (one chunk) all but
        one process had nothing, and the pass depended on the number of processes. The mixture is drawn one
        document at a time, so the pass is a weighted mix of every dataset's held-out documents: with
        `docs_per_read` documents per draw, a small held-out split (the built-in corpora's) was read whole by the
        first draw and validation scored one dataset only. Datasets prepared with `--val_fraction 0` have no
        held-out split and take no part; with none left, there is no validation. Refused in one line: held-out
        splits too small for one batch (`check_before_start` makes the pass, so a fit stops before any work)."""
        if self._validation_pass is not None:
            return self._validation_pass
        manifests = self._read_manifests()
        with_val = [i for i, m in enumerate(manifests) if m.get("splits", {}).get("val", {}).get("tokens")]
        if not with_val:
            self._validation_pass = []
            return self._validation_pass
        readers = [
            HeldOutDocuments(self._documents(self.datasets[i], "val", shuffle=False), manifests[i]["splits"]["val"])
            for i in with_val
        ]
        stream = PackedStream(
            readers,
            self.weights[with_val] / self.weights[with_val].sum(),
            seed=self.seed,
            batch_size=lambda: self.val_shape[0],
            seq_len=lambda: self.val_shape[1],
            fingerprint=self.fingerprint,
            length=self.val_batches,
            repeat=False,
        )
        batches = list(stream)
        if self.val_batches > 0 and not batches:
            held_out = sum(manifests[i]["splits"]["val"]["tokens"] for i in with_val)
            batch, length = self.val_shape
            raise ValueError(
                f"the held-out splits hold {held_out} tokens, less than one validation batch of {batch} x {length}; "
                "prepare the data with a larger --val_fraction, or set data.val_batches=0 for no validation"
            )
        self._validation_pass = batches
        return batches

    def test_dataloader(self) -> FixedBatches:
        """Testing reads the held-out split too: `prepare` makes train and val splits only."""
        return self.val_dataloader()

    def _length_hint(self) -> int:
        """Batches in the one long epoch: enough for max_steps (Lightning then needs no look-ahead batch)."""
        trainer = self.trainer
        if trainer is not None and trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps * trainer.accumulate_grad_batches
        return 10**12


def _split_dir(dataset: str, split: str) -> str:
    """`dataset/split`; a URL keeps its `scheme://` (a Path would make `s3://b/x` into `s3:/b/x`)."""
    return f"{dataset.rstrip('/')}/{split}" if remote.is_remote(dataset) else str(Path(dataset) / split)


class HeldOutDocuments:
    """A held-out split's documents in order, one per read, read by position (`dataset[i]`), which litdata serves
    the same way on every process: iterating a StreamingDataset would give each process its own chunks only."""

    def __init__(self, dataset: CheckedDocuments, split: dict[str, Any]) -> None:
        self.dataset, self.documents = dataset, int(split["documents"])

    def __iter__(self) -> Iterator[list[Any]]:
        for index in range(self.documents):
            yield [self.dataset[index]]


class FixedBatches:
    """A fixed, re-iterable list of batches that Lightning sees as ONE loader (a plain list would be read as
    one loader per element)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batches[index]


class PackedStream:
    """Infinite (or `length`-bounded) iterable of packed batches with an exact, checkpointable position.

    `loaders` yield lists of documents: litdata loaders for training (their state is the stream's position), or
    `HeldOutDocuments` for the validation pass (made whole, never checkpointed)."""

    def __init__(
        self,
        loaders: list[StreamingDataLoader] | list[HeldOutDocuments],
        weights: np.ndarray,
        *,
        seed: int,
        batch_size: Callable[[], int],
        seq_len: Callable[[], int],
        fingerprint: str,
        length: int,
        repeat: bool = True,
    ) -> None:
        self.loaders, self.weights, self.seed = loaders, weights, seed
        self.batch_size, self.seq_len, self.fingerprint = batch_size, seq_len, fingerprint
        self.length, self.repeat = length, repeat
        self.packer = TokenPacker()
        self.reads = 0
        self._iterators: list[Iterator | None] = [None] * len(loaders)
        self._exhausted = [False] * len(loaders)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        emitted = 0
        while emitted < self.length:
            batch_size, seq_len = self.batch_size(), self.seq_len()
            while not self.packer.can_emit(batch_size, seq_len):
                if not self._read():
                    return
            yield self.packer.emit(batch_size, seq_len)
            emitted += 1

    def _read(self) -> bool:
        """Move the next documents of one dataset into the packer; False when every dataset is done."""
        live = np.array([not done for done in self._exhausted])
        if not live.any():
            return False
        weights = self.weights * live
        draw = np.random.default_rng([self.seed, self.reads]).random()
        index = int(np.searchsorted(np.cumsum(weights / weights.sum()), draw, side="right"))
        index = min(index, len(self.loaders) - 1)
        self.reads += 1
        documents = self._next_documents(index)
        if documents is None:
            return self._read()
        self.packer.add_documents(documents)
        return True

    def _next_documents(self, index: int) -> list[Any] | None:
        if self._iterators[index] is None:
            self._iterators[index] = iter(self.loaders[index])
        try:
            return next(self._iterators[index])
        except StopIteration:
            self._iterators[index] = None
            if not self.repeat:
                self._exhausted[index] = True
                return None
            self._iterators[index] = iter(self.loaders[index])  # next pass over this dataset
            return next(self._iterators[index])

    def state_dict(self) -> dict[str, Any]:
        """The position of this process's stream; with several processes, every rank's position (each reads its
        own share of the data, and Lightning keeps the loader state of rank 0 only)."""
        local = {
            "fingerprint": self.fingerprint,
            "reads": self.reads,
            "packer": self.packer.state_dict(),
            "loaders": [loader.state_dict() for loader in self.loaders],
        }
        world = _world_size()
        if world == 1:
            return local
        ranks: list[Any] = [None] * world
        torch.distributed.all_gather_object(ranks, local)
        return {"ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        world = _world_size()
        saved_world = len(state["ranks"]) if "ranks" in state else 1
        if saved_world != world:
            raise ValueError(
                f"the checkpoint's data position was saved by {saved_world} process(es) but this run has {world}; "
                f"resume with {saved_world} (each process's place in the data is saved), or start a new run"
            )
        if "ranks" in state:
            state = state["ranks"][torch.distributed.get_rank()]
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"the checkpoint was trained on data {state['fingerprint']} but the configured datasets are "
                f"{self.fingerprint}; resume with the same datasets, weights and seed, or start a new run"
            )
        self.reads = int(state["reads"])
        self.packer.load_state_dict(state["packer"])
        for loader, loader_state in zip(self.loaders, state["loaders"], strict=True):
            loader.load_state_dict(loader_state)
        self._iterators = [None] * len(self.loaders)


def _world_size() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1
