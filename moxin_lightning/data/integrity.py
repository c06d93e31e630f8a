"""Is a prepared dataset what its manifest says? Checks at three costs, so that nothing trains on bad data.

* `check_dataset` (setup, always; reads only `index.json` and file sizes): every split the manifest lists has an
  `index.json` whose item count, chunk count and (for token items) token count equal the manifest's, and every
  chunk file exists with exactly the size `index.json` gives. A missing or cut-short chunk is named as such here,
  instead of litdata later waiting on it as on a "hung download".
* `verify_dataset` (`python -m moxin_lightning verify DATASET`, or `PretrainData(verify=True)`; reads every
  byte): each chunk file's sha256 against the one `prepare` recorded (`splits.<split>.chunk_sha256`), so a chunk
  whose bytes were rewritten is named. A manifest from before chunk hashes is checked by the split's token-stream
  sha256 instead (documents and tokens layouts), which names the split only.
* `check_ids` (as batches are made, per document or record; one comparison per array): token ids within
  [0, vocab_size), so corrupted ids are one line naming the dataset and the chunk or record, not an IndexError in
  the embedding.

Every failure raises `DataIntegrityError` (a ValueError: the commands print it as one `error:` line, exit 2),
naming the dataset, the chunk and what to do.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_HEADER_BYTES = 4  # a litdata chunk: uint32 item count, uint32 offsets[count + 1], then the items
_FIX = "prepare it again (python -m moxin_lightning prepare ... --overwrite)"


class DataIntegrityError(ValueError):
    """A prepared dataset that does not match its manifest; the message is one line naming the dataset and chunk."""


def chunk_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every chunk file of a split folder, by file name (what `prepare` records in the manifest)."""
    return {path.name: _file_sha256(path) for path in sorted(folder.glob("chunk-*.bin"))}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _items_key(entry: dict[str, Any]) -> str:
    return "records" if "records" in entry else "documents"


def check_dataset(dataset: str | Path, manifest: dict[str, Any]) -> None:
    """The cheap structural check of every split of a prepared dataset, local or on an object store (see the module
    docstring)."""
    for split, entry in manifest.get("splits", {}).items():
        check_split(dataset, split, entry)


class _Files:
    """Reads a split's files where they are: a local folder, or an object-store prefix through fsspec (one listing
    gives every object's size, so the check costs one request per split, not one per chunk)."""

    def __init__(self, dataset: str | Path, name: str) -> None:
        from moxin_lightning.data.remote import is_remote

        self.remote = is_remote(dataset)
        if self.remote:
            import fsspec

            self.fs, root = fsspec.core.url_to_fs(f"{str(dataset).rstrip('/')}/{name}")
            self.root = root.rstrip("/")
            self.fs.invalidate_cache(self.root)
            self.sizes = {info["name"].rsplit("/", 1)[-1]: info["size"] for info in self.fs.ls(self.root, detail=True)}
        else:
            self.folder = Path(dataset) / name

    def text(self, name: str) -> str:
        if not self.remote:
            return (self.folder / name).read_text()
        if name not in self.sizes:
            raise FileNotFoundError(name)
        with self.fs.open(f"{self.root}/{name}", "r") as file:
            return file.read()

    def size(self, name: str) -> int:
        if not self.remote:
            return (self.folder / name).stat().st_size
        if name not in self.sizes:
            raise FileNotFoundError(name)
        return int(self.sizes[name])


def check_split(dataset: str | Path, split: str, entry: dict[str, Any]) -> None:
    where = f"dataset {dataset}: {split}/"
    try:
        files = _Files(dataset, entry.get("path", split))
        index = json.loads(files.text("index.json"))
    except (OSError, ValueError) as error:
        reason = "is missing" if isinstance(error, FileNotFoundError) else "cannot be read"
        raise DataIntegrityError(f"{where}index.json {reason}; {_FIX}") from None
    chunks = index.get("chunks") or []
    key = _items_key(entry)
    items = sum(int(chunk.get("chunk_size") or 0) for chunk in chunks)
    if items != entry.get(key):
        raise DataIntegrityError(
            f"{where}index.json holds {items} {key} but the manifest says {entry.get(key)}; the manifest or the "
            f"shards were changed after prepare: {_FIX}"
        )
    if "chunks" in entry and len(chunks) != entry["chunks"]:
        raise DataIntegrityError(
            f"{where}index.json lists {len(chunks)} chunks but the manifest says {entry['chunks']}; {_FIX}"
        )
    for chunk in chunks:
        try:
            size = files.size(chunk["filename"])
        except FileNotFoundError:
            raise DataIntegrityError(f"{where}{chunk['filename']} is missing; {_FIX}") from None
        if size != chunk["chunk_bytes"]:
            state = "truncated" if size < chunk["chunk_bytes"] else "longer than index.json says"
            raise DataIntegrityError(
                f"{where}{chunk['filename']} is {state} ({size} bytes, index.json says {chunk['chunk_bytes']}); {_FIX}"
            )
    tokens = _tokens(index)
    if tokens is not None and "tokens" in entry and tokens != entry["tokens"]:
        raise DataIntegrityError(
            f"{where}the chunks hold {tokens} tokens but the manifest says {entry['tokens']}; the manifest or the "
            f"shards were changed after prepare: {_FIX}"
        )


def _tokens(index: dict[str, Any]) -> int | None:
    """Tokens in a split of int32 token items, from index.json alone (None for record items)."""
    config = index.get("config") or {}
    chunks = index.get("chunks") or []
    if config.get("item_loader") == "TokensLoader":
        return sum(int(chunk.get("dim") or 0) for chunk in chunks)
    if config.get("data_format") == ["no_header_numpy:2"]:  # one int32 array per item, after a 4-byte item prefix
        return sum((chunk["chunk_bytes"] - _HEADER_BYTES * (2 * chunk["chunk_size"] + 2)) // 4 for chunk in chunks)
    return None


def verify_dataset(dataset: str | Path, manifest: dict[str, Any], report: Callable[[str], None] | None = None) -> None:
    """Re-hash every split of a local dataset against its manifest; `report` gets one line per verified split."""
    check_dataset(dataset, manifest)
    for split, entry in manifest.get("splits", {}).items():
        folder = Path(dataset) / entry.get("path", split)
        recorded = entry.get("chunk_sha256")
        if recorded is not None:
            found = chunk_hashes(folder)
            for name in sorted(set(recorded) | set(found)):
                if recorded.get(name) != found.get(name):
                    raise DataIntegrityError(
                        f"dataset {dataset}: {split}/{name} does not match the manifest's sha256 "
                        f"({(found.get(name) or 'no file')[:12]} vs {(recorded.get(name) or 'not listed')[:12]}): "
                        f"its bytes changed after prepare; {_FIX}"
                    )
            how = f"{len(found)} chunks match their sha256"
        elif manifest.get("layout", "documents") in ("documents", "tokens"):
            from moxin_lightning.data.shards import read_tokens

            digest = hashlib.sha256()
            for piece in read_tokens(folder):
                digest.update(np.ascontiguousarray(piece, dtype="<i4"))  # no bytes copy
            if digest.hexdigest() != entry.get("sha256"):
                raise DataIntegrityError(
                    f"dataset {dataset}: {split}'s token stream does not match the manifest's sha256 (this manifest "
                    f"predates chunk hashes, so the chunk is not known); {_FIX}"
                )
            how = "token stream matches its sha256"
        else:
            raise DataIntegrityError(
                f"dataset {dataset}: {split} has no chunk hashes in its manifest (prepared before they were "
                f"recorded), so it cannot be verified; {_FIX}"
            )
        if report is not None:
            key = _items_key(entry)
            report(f"{split}: {entry.get(key)} {key}, {entry.get('tokens')} tokens; {how}")


def check_ids(ids: np.ndarray, vocab_size: int, dataset: str, where: str) -> None:
    """Refuse token ids outside [0, vocab_size) in one line naming the dataset and `where` (chunk or record)."""
    if ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
        raise DataIntegrityError(
            f"dataset {dataset}: {where} holds token id {bad}, outside the vocabulary of {vocab_size} "
            f"(corrupted data); run python -m moxin_lightning verify {dataset}, then {_FIX}"
        )


def register(subparsers: Any) -> None:
    """Add the `verify` subcommand."""
    parser = subparsers.add_parser(
        "verify",
        help="re-hash a prepared dataset's chunks against its manifest.json",
        description="Re-hash every split of a prepared dataset against manifest.json; exit 2 naming the first "
        "chunk that differs.",
    )
    parser.add_argument("dataset", help="a folder prepare wrote (train/, val/, manifest.json)")
    parser.set_defaults(run=_run)


def _run(args: Any) -> None:
    from moxin_lightning.data import manifest as manifests

    data = manifests.read(args.dataset)
    verify_dataset(args.dataset, data, report=lambda line: print(f"{args.dataset} {line}", flush=True))
    print(f"verified {args.dataset}: fingerprint {data.get('fingerprint')}")
