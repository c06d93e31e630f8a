"""What a `prepare` worker does with one unit of work (one source): read, pick the split, tokenize.

The split of a document is a pure function of its text and the seed (`is_validation`), so every worker decides
it alone, duplicates of a document land in the same split (no exact train/val leakage), and the choice does
not depend on the input order or the number of workers. When the hash rule would hold out none of a small
corpus, `prepare` holds out the document(s) with the smallest hash instead (`scan_split`, before any work): the
workers get that hash as `forced`.

Every source is read and tokenized once. Training documents go straight to litdata; a unit's validation
tokens (0.5% by default) are saved to `val_dir/<unit>.npz`, and `ValTokens` turns those files into the val
shards afterwards, in unit order, without reading or tokenizing anything again.

A worker reports through small JSON files in `stats_dir`, one per unit, rewritten after every batch (the main
process sums them for progress) and marked `done` at the end. On failure it writes an `.error` report (a
one-line message and the traceback) and a `failed` flag, and *returns* instead of raising: every worker then
skips its remaining units, litdata finishes normally, and the main process raises the message. Raising inside
litdata (0.2.76) would make it kill the workers but not the helper process each worker starts, which then
waits forever as an orphan; it would also print a multi-line traceback.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moxin_lightning.atomic import written_file
from moxin_lightning.data.shards import DTYPE
from moxin_lightning.data.sources import DataError, Record, Source, SourceStats
from moxin_lightning.tokenizers.base import Tokenizer

BATCH_CHARS = 1 << 20  # text per `encode_batch` call: large enough for sentencepiece's threads, small in memory
PIECE_CHARS = 1 << 18  # a document longer than BATCH_CHARS is tokenized in pieces of about this many characters
_ANCHOR = "a"  # encoded in front of every piece after the first, then its ids removed (see `encode_long`)
_SPLIT = re.compile(r"(?<=[A-Za-z0-9]) (?=[A-Za-z0-9])")  # one space between two ASCII letters or digits
BATCH_DOCUMENTS = 4096
SPLIT_RULE = (
    "val when int.from_bytes(hashlib.blake2b(f'{seed}\\n'.encode() + text.encode('utf-8'), digest_size=8)"
    ".digest(), 'little') < val_fraction * 2**64"
)


AT_LEAST_ONE_RULE = (
    "at least one held out: the rule held out none of the (at least 2) usable items, so the item(s) whose 64-bit "
    "value under the rule is the smallest (hash, in hex; path: where the first one is) went to val"
)


def split_hash(text: str, seed: int = 0) -> int:
    """The 64-bit value `SPLIT_RULE` compares for a document: it decides the split, and the smallest one names the
    document held out when the rule picks none (`scan_split`)."""
    digest = hashlib.blake2b(f"{seed}\n".encode() + text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def hash_in_val(value: int, val_fraction: float) -> bool:
    """Whether `SPLIT_RULE` puts a document with split hash `value` in val (nothing does at fraction 0)."""
    return val_fraction > 0 and value < val_fraction * 2**64


def is_validation(text: str, val_fraction: float, seed: int = 0, forced: int | None = None) -> bool:
    """Whether a document goes to the validation split (see `SPLIT_RULE`); `forced`: the split hash `prepare` holds
    out when the rule picks no document (see `scan_split`)."""
    if val_fraction <= 0:
        return False
    value = split_hash(text, seed)
    return hash_in_val(value, val_fraction) or value == forced


@dataclass(frozen=True)
class SplitItem:
    """One usable item as the split pre-pass sees it: its split hash, whether the rule holds it out, where it is, and
    what `usable` needs to confirm it (records: the parsed record)."""

    value: int
    held: bool
    where: str
    payload: Any = None


@dataclass(frozen=True)
class SplitScan:
    """What the pre-pass over the inputs (`scan_split`) learned before any tokenizing.

    `items`: the usable items read (all of them when `complete`); `held`: the hash rule holds out a usable one;
    `forced`: the split hash to hold out instead, when it holds out none of at least 2 (`where`: the first such
    item)."""

    items: int
    complete: bool
    held: bool = False
    forced: int | None = None
    where: str = ""

    @property
    def lone(self) -> bool:
        """The inputs hold exactly one usable item: a val split would leave nothing to train on."""
        return self.complete and self.items == 1 and (self.held or self.forced is not None)


def scan_split(items: Iterable[SplitItem], val: bool, usable: Callable[[Any], bool] | None = None) -> SplitScan:
    """Read the items in input order until the split is known to need nothing more: with `val`, until the hash rule
    holds out a usable item and at least 2 were seen (a corpus of real size: within a few hundred items), else
    until the first item. Read to the end, it knows the count, and the usable item with the smallest split hash,
    which is held out when the rule holds out none (common splitters round the held-out count up).

    Everything here is a pure function of the inputs and the arguments, so every node of a multi-node run and any
    number of workers make the same choice. `usable(payload)` confirms that an item survives encoding (records can
    be cut or skipped there); it is asked only for held items and for each new smallest hash, a few times."""
    confirm = usable or (lambda payload: True)
    count, held, best = 0, False, None
    iterator = iter(items)
    try:
        for item in iterator:
            count += 1
            if not val:
                return SplitScan(count, complete=False)
            if item.held and not held:
                held = confirm(item.payload)
            if held and count >= 2:
                return SplitScan(count, complete=False, held=True)
            if not held and not item.held and (best is None or item.value < best.value) and confirm(item.payload):
                best = item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:  # a generator left mid-file closes its file now
            close()
    if held or best is None:
        return SplitScan(count, complete=True, held=held)
    return SplitScan(count, complete=True, forced=best.value, where=best.where)


def lone_item_error(val_fraction: float, what: str, option: str) -> DataError:
    """The one-line refusal of a val split of a single item (it would leave nothing to train on)."""
    return DataError(f"val_fraction {val_fraction} with only 1 {what}: pass {option} 0 for no val split, or add more")


def split_section(val_fraction: float, seed: int, rule: str, scan: SplitScan | None) -> dict[str, Any]:
    """The manifest's `split`: the hash rule, and `forced_val` only when it was applied, so every dataset the rule
    alone splits keeps the manifest (and fingerprint) it had before the at-least-one rule existed."""
    section: dict[str, Any] = {"val_fraction": val_fraction, "seed": seed, "rule": rule}
    if scan is not None and scan.forced is not None:
        section["forced_val"] = {"rule": AT_LEAST_ONE_RULE, "hash": f"{scan.forced:016x}", "path": scan.where}
    return section


def announce_forced(scan: SplitScan, val_fraction: float, what: str) -> None:
    """A console line when the at-least-one rule applies, so a small corpus's split is no surprise."""
    if scan.forced is not None:
        print(
            f"prepare: val_fraction {val_fraction} held out none of the {scan.items} {what} by hash; holding out "
            f"the one with the smallest hash ({scan.where}), recorded as split.forced_val in the manifest",
            file=sys.stderr,
            flush=True,
        )


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """`tokenizer.encode(text)` for each text, in one `encode_batch` call when the tokenizer has one."""
    batch = getattr(tokenizer, "encode_batch", None)
    return batch(texts) if batch is not None else [tokenizer.encode(text) for text in texts]


def encode_long(tokenizer: Tokenizer, text: str, frame: tuple[int, int] | None = None) -> np.ndarray:
    """`tokenizer.encode(text)` as int32 (between `frame`'s BOS and EOS when given), for a text of any length,
    holding about BATCH_CHARS of it as Python ids at a time.

    Encoding a 50 MB document whole makes a Python list of ~12M ints (~450 MB) and then copies of it: about 50x
    the text. Here the text is cut into pieces of about PIECE_CHARS characters, at a single space between two
    ASCII letters or digits, and each piece after the first is encoded after `_ANCHOR` ("a"), whose ids are then
    removed: "a" + " word..." gives the piece exactly the ids it has inside the whole text, because a
    SentencePiece model (split_by_whitespace, the default and Moxin's/Mistral's setting) never merges a piece
    across the start of a word, and the dummy-prefix space goes to the anchor, as it goes to the first word of
    the whole text; the MoE router sees a Latin run on both sides of the cut. Tested against whole-text encoding
    for our tokenizers on prose, code and mixed scripts. Where a tokenizer could differ (a model trained with
    split_by_whitespace=false, or one whose encoding of "a" + piece does not start with its encoding of "a"), the
    text is encoded whole instead: exactly the tokenizer's ids, at the old memory cost. A text with no such space
    in its remainder (e.g. one CJK line or base64) is encoded whole from there on.
    """
    head, tail = ([np.array([frame[0]], dtype=DTYPE)], [np.array([frame[1]], dtype=DTYPE)]) if frame else ([], [])
    if len(text) <= BATCH_CHARS:
        return np.concatenate([*head, np.asarray(tokenizer.encode(text), dtype=DTYPE), *tail])
    anchor = tokenizer.encode(_ANCHOR)
    cuts = [0]
    while len(text) - cuts[-1] > PIECE_CHARS:
        found = _SPLIT.search(text, cuts[-1] + PIECE_CHARS)
        if found is None:
            break
        cuts.append(found.start())
    cuts.append(len(text))
    parts: list[np.ndarray] = []
    group: list[str] = []  # pieces encoded in one call; all but the text's first carry the anchor
    for start, end in zip(cuts[:-1], cuts[1:], strict=True):
        group.append(text[start:end] if start == 0 else _ANCHOR + text[start:end])
        if sum(map(len, group)) < BATCH_CHARS and end < len(text):
            continue
        for ids in encode_documents(tokenizer, group):
            if parts:  # not the text's first piece: drop the anchor's ids
                if ids[: len(anchor)] != anchor:
                    return np.concatenate([*head, np.asarray(tokenizer.encode(text), dtype=DTYPE), *tail])
                ids = ids[len(anchor) :]
            parts.append(np.asarray(ids, dtype=DTYPE))
        group = []
    return np.concatenate([*head, *parts, *tail])  # one copy: the framed document litdata writes


@dataclass
class TokenizeUnits:
    """The function litdata runs in each worker: unit index -> one int32 array, BOS + ids + EOS, per training
    document, in order; the unit's validation documents go to `val_dir`."""

    sources: list[Source]
    tokenizer: Tokenizer
    val_fraction: float
    seed: int
    stats_dir: Path
    val_dir: Path
    forced: int | None = None  # the split hash held out when the rule picks no document (`scan_split`)

    def __call__(self, unit: int) -> Iterator[np.ndarray]:
        if failed(self.stats_dir):
            return
        source = self.sources[unit]
        stats = SourceStats(source.label, source.path)
        counts = {split: {"documents": 0, "tokens": 0} for split in ("train", "val")}
        val: list[np.ndarray] = []
        batch: list[Record] = []
        chars = 0
        try:
            for record in source.read(stats):
                stats.count(record)
                if record.text is None:
                    continue
                batch.append(record)
                chars += len(record.text)
                if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCUMENTS:
                    yield from self._encode(batch, counts, val)
                    self._report(unit, stats, counts, done=False)
                    batch, chars = [], 0
                    if failed(self.stats_dir):
                        return
            yield from self._encode(batch, counts, val)
            if val:
                lengths = np.array([tokens.size for tokens in val], dtype=np.int64)
                np.savez(self.val_dir / f"{unit:06d}.npz", tokens=np.concatenate(val), lengths=lengths)
        except Exception as error:
            self._fail(unit, source, batch, error)
            return
        self._report(unit, stats, counts, done=True)

    def _encode(self, batch: list[Record], counts: dict, val: list[np.ndarray]) -> Iterator[np.ndarray]:
        """Tokenize a batch; yield each training document as one array (one litdata item per document)."""
        if not batch:
            return
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        texts = [record.text for record in batch]
        short = [text for text in texts if len(text) <= BATCH_CHARS]
        encoded = iter(encode_documents(self.tokenizer, short))
        for text in texts:  # a long document is tokenized piece by piece (`encode_long`), in bounded memory
            if len(text) <= BATCH_CHARS:
                ids = next(encoded)
                tokens = np.empty(len(ids) + 2, dtype=DTYPE)
                tokens[0], tokens[1:-1], tokens[-1] = bos, ids, eos
            else:
                tokens = encode_long(self.tokenizer, text, frame=(bos, eos))
            split = "val" if is_validation(text, self.val_fraction, self.seed, self.forced) else "train"
            counts[split]["documents"] += 1
            counts[split]["tokens"] += tokens.size
            if split == "val":
                val.append(tokens)
            else:
                yield tokens

    def _report(self, unit: int, stats: SourceStats, counts: dict, *, done: bool) -> None:
        report = {"unit": unit, "done": done, **counts, "source": stats.to_dict()}
        _write_atomic(self.stats_dir / f"{unit:06d}.json", json.dumps(report))

    def _fail(self, unit: int, source: Source, batch: list[Record], error: Exception) -> None:
        where = f"{batch[0].where} .. {batch[-1].where}" if batch else source.path
        report_failure(self.stats_dir, unit, f"tokenizing {where}", error)


def report_failure(stats_dir: Path, unit: int, doing: str, error: Exception) -> None:
    """Write a unit's `.error` report and the `failed` flag (see the module docstring): a DataError's own line, or
    `<doing> failed: <type>: <first line>` for anything else, with the traceback kept for debugging."""
    lines = str(error).strip().splitlines()
    message = lines[0] if lines else ""
    if not isinstance(error, DataError):
        message = f"{doing} failed: {type(error).__name__}: {message}".rstrip(": ")
    report = {
        "unit": unit,
        "data_error": isinstance(error, DataError),
        "message": message,
        "traceback": traceback.format_exc(),
    }
    _write_atomic(stats_dir / f"{unit:06d}.error", json.dumps(report))
    (stats_dir / "failed").touch()


@dataclass
class ValTokens:
    """The function litdata runs to write the val split: unit -> the unit's saved documents, in order (none when
    it saved none). Indexed by unit, so a multi-node run maps each unit to the node that tokenized it."""

    val_dir: Path

    def __call__(self, unit: int) -> Iterator[np.ndarray]:
        path = self.val_dir / f"{unit:06d}.npz"
        if not path.is_file():
            return
        with np.load(path) as saved:
            tokens, lengths = saved["tokens"], saved["lengths"]
        yield from np.split(tokens, np.cumsum(lengths)[:-1])


def failed(stats_dir: Path) -> bool:
    return (stats_dir / "failed").exists()


def read_reports(stats_dir: Path, kind: str = "json") -> list[dict[str, Any]]:
    """The reports written so far, in unit order (a report being replaced is read whole or not at all)."""
    reports = []
    for path in sorted(stats_dir.glob(f"*.{kind}")):
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return reports


def _write_atomic(path: Path, text: str) -> None:
    with written_file(path) as temporary:
        temporary.write_text(text)
