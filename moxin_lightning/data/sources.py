"""Input sources for `prepare`: what a `--input` names, and the documents each one holds.

An `--input` is a local path, a glob, a folder, an fsspec URL (`s3://bucket/shards/*.jsonl.gz`, read through
`fsspec.open`, so any store with credentials configured works) or `builtin:<name>` (see `builtin.py`).
It expands, in the main process, into a list of *sources*: small picklable descriptions of one unit of
work. Workers call `source.read(stats)` and get `Record`s back, in a fixed order, so the same inputs always
give the same documents in the same order.

Every record a source holds comes back either as a document or as a skip with its reason: nothing is dropped
silently, and the reasons are counted per source in the manifest. A problem that makes a whole file unusable
(it cannot be opened, a compressed stream is corrupt, a parquet file lacks the column) raises `DataError`,
whose message is one line naming the file and the fix.

Formats, by file name (a `.gz`, `.bz2`, `.xz` or `.zst` suffix on `.txt`/`.jsonl` means compressed):
  * `.txt`     one document per file, the whole file;
  * `.jsonl`   one JSON object per line, the document in field `text_key`; blank lines are not records;
  * `.parquet` one document per row, column `text_key`.

Structured records (chat conversations, preference pairs) come from the same inputs as whole JSON objects through
`read_objects`, which judges a `.jsonl` line by the same rules (`json_objects`) and skips under the same reasons.
"""

from __future__ import annotations

import bz2
import glob as globlib
import gzip
import hashlib
import io
import json
import lzma
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

# Why a record was not used as a document. The manifest counts skips under exactly these strings.
INVALID_UTF8 = "invalid UTF-8"
MISSING_KEY = "missing text key"
NOT_A_STRING = "text not a string"
EMPTY = "empty text"
BAD_JSON = "unreadable JSON line"
NOT_AN_OBJECT = "not a JSON object"

FORMATS = (".txt", ".jsonl", ".parquet")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
SUPPORTED = ".txt, .jsonl (optionally .gz/.bz2/.xz/.zst) or .parquet"
_MAX_EXAMPLES = 5  # skipped-record locations kept per source, to find them again


class DataError(ValueError):
    """An input that cannot be used as given; the message is one line: what is wrong and what to do."""


@dataclass(frozen=True)
class Record:
    """One record of a source: a document (`text`) or a skip (`skip` holds the reason). `where` locates it."""

    where: str
    text: str | None = None
    skip: str | None = None


@dataclass
class SourceStats:
    """What reading one source found; workers fill it, the manifest reports it.

    `sha256` covers the bytes read: the raw file (compressed, as stored) for files, so `sha256sum` on the
    file gives the same digest; the documents' bytes, each followed by a NUL byte, for builtin sources.
    """

    label: str
    path: str
    bytes: int = 0
    documents: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)
    digest: Any = field(default_factory=hashlib.sha256, repr=False)

    def update(self, data: bytes) -> None:
        self.bytes += len(data)
        self.digest.update(data)

    def count(self, record: Record) -> None:
        if record.skip is None:
            self.documents += 1
            return
        self.skipped[record.skip] += 1
        if len(self.skipped_examples) < _MAX_EXAMPLES:
            self.skipped_examples.append(f"{record.where}: {record.skip}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "bytes": self.bytes,
            "sha256": self.digest.hexdigest(),
            "documents": self.documents,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_examples": list(self.skipped_examples),
        }


class Source(Protocol):
    """One unit of work: picklable, read in a worker. `label` is the input it came from (a file's own path, or the
    `builtin:` input shared by all its parts); `path` is what the manifest and error messages call it."""

    label: str
    path: str

    def read(self, stats: SourceStats) -> Iterator[Record]: ...


def checked(where: str, text: Any) -> Record:
    """A document, or the reason it cannot be one. Shared by every reader so the rules are the same everywhere.

    Lone surrogates (e.g. from JSON `"\\ud800"`) cannot be encoded as UTF-8, so no tokenizer can take them: they
    count as invalid UTF-8, like undecodable bytes.
    """
    if text is None:
        return Record(where, skip=MISSING_KEY)
    if not isinstance(text, str):
        return Record(where, skip=NOT_A_STRING)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return Record(where, skip=INVALID_UTF8)
    if not text.strip():
        return Record(where, skip=EMPTY)
    return Record(where, text=text)


def decoded(where: str, data: bytes) -> Record:
    try:
        return checked(where, data.decode("utf-8"))
    except UnicodeDecodeError:
        return Record(where, skip=INVALID_UTF8)


class _HashingReader(io.RawIOBase):
    """Passes a binary stream through, counting and hashing every byte, so a file is hashed as it is read."""

    def __init__(self, raw: IO[bytes], stats: SourceStats) -> None:
        self.raw, self.stats = raw, stats

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        self.stats.update(data)
        return len(data)

    def drain(self) -> None:
        """Read what the decoder left (e.g. trailing bytes after a gzip stream), so the hash covers the file."""
        while self.read(1 << 20):
            pass


def split_name(path: str) -> tuple[str, str]:
    """(format, compression) from a file name, e.g. 'a.jsonl.gz' -> ('.jsonl', '.gz'); DataError if unsupported."""
    name = path.rsplit("/", 1)[-1].lower()
    compression = next((suffix for suffix in COMPRESSIONS if name.endswith(suffix)), "")
    stem = name[: len(name) - len(compression)]
    kind = next((suffix for suffix in FORMATS if stem.endswith(suffix)), "")
    if not kind or (kind == ".parquet" and compression):
        raise DataError(f"unsupported input {path}: expected {SUPPORTED}")
    return kind, compression


def check_codec(path: str, compression: str) -> None:
    """Fail before any work when a compressed input needs a package that is not installed."""
    if compression == ".zst":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise DataError(f"{path} is zstd-compressed: pip install zstandard to read it") from None


def _decompress(stream: IO[bytes], compression: str) -> IO[bytes]:
    if compression == ".gz":
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if compression == ".bz2":
        return bz2.BZ2File(stream)
    if compression == ".xz":
        return lzma.LZMAFile(stream)
    if compression == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
    return stream


@dataclass(frozen=True)
class FileSource:
    """One input file; `label` and `path` are the path or URL as listed."""

    path: str
    text_key: str = "text"

    @property
    def label(self) -> str:
        return self.path

    def read(self, stats: SourceStats) -> Iterator[Record]:
        import fsspec

        kind, compression = split_name(self.path)
        try:
            with fsspec.open(self.path, "rb") as raw:
                if kind == ".parquet":
                    yield from self._parquet(raw, stats)
                    return
                hashing = _HashingReader(raw, stats)
                data = _decompress(io.BufferedReader(hashing, buffer_size=1 << 20), compression)
                yield from (self._jsonl(data) if kind == ".jsonl" else self._txt(data))
                hashing.drain()
        except DataError:
            raise
        except (OSError, EOFError, lzma.LZMAError, ValueError) as error:
            raise _unreadable(self.path, error) from None

    def _txt(self, data: IO[bytes]) -> Iterator[Record]:
        yield decoded(self.path, data.read())

    def _jsonl(self, data: IO[bytes]) -> Iterator[Record]:
        for found in json_objects(self.path, data):
            if found.value is None:
                yield Record(found.where, skip=found.skip)
            else:
                yield checked(found.where, found.value.get(self.text_key))

    def _parquet(self, raw: IO[bytes], stats: SourceStats) -> Iterator[Record]:
        import pyarrow.parquet as pq

        while chunk := raw.read(1 << 20):  # parquet is read by seeking, so hash the file in its own pass
            stats.update(chunk)
        raw.seek(0)
        table = pq.ParquetFile(raw)
        if self.text_key not in table.schema_arrow.names:
            columns = ", ".join(table.schema_arrow.names)
            raise DataError(f"{self.path} has no column {self.text_key!r} (columns: {columns}); pass --text_key")
        row = 0
        for batch in table.iter_batches(columns=[self.text_key], batch_size=4096):
            for value in batch.column(0).to_pylist():
                where = f"{self.path}#{row}"
                yield decoded(where, value) if isinstance(value, bytes) else checked(where, value)
                row += 1


def _unreadable(path: str, error: BaseException) -> DataError:
    """The one-line error for a file that cannot be read at all, naming it and the fix."""
    text = str(error).strip().splitlines()
    return DataError(f"cannot read {path}: {text[0] if text else type(error).__name__}; fix or remove the file")


def expand_input(spec: str, text_key: str = "text") -> list[Source]:
    """The sources one `--input` names, in a fixed order (glob matches sorted); DataError if it names nothing."""
    if spec.startswith("builtin:"):
        from moxin_lightning.data.builtin import expand_builtin, local_parts

        return [part for one in local_parts(spec) for part in expand_builtin(one)]  # builtin:local: both corpora
    import fsspec.core

    fs, path = fsspec.core.url_to_fs(spec)

    def name(found: str) -> str:
        return found if "://" not in spec else fs.unstrip_protocol(found)

    if globlib.has_magic(path):
        paths = sorted(fs.glob(path))
        if not paths:
            raise DataError(f"--input {spec} matched no files; check the path and quote the glob for the shell")
    elif fs.isdir(path):
        paths = sorted(p for p in fs.find(path) if _supported(p))
        if not paths:
            raise DataError(f"--input {spec} is a folder with no {SUPPORTED} files; pass a glob or the files")
    elif fs.exists(path):
        paths = [path]
    else:
        raise DataError(f"--input {spec} not found; check the path (a glob must match at least one file)")
    sources = []
    for found in paths:
        if fs.isdir(found):
            continue
        _, compression = split_name(name(found))
        check_codec(name(found), compression)
        sources.append(FileSource(name(found), text_key))
    if not sources:
        raise DataError(f"--input {spec} matched only folders; match the files inside them")
    return sources


def _supported(path: str) -> bool:
    try:
        split_name(path)
    except DataError:
        return False
    return True


# ------------------------------------------------------------------------------------- whole JSON objects


@dataclass(frozen=True)
class ObjectRecord:
    """One record of a structured input: a JSON object (`value`) or a skip (`skip` holds the reason). `where`
    locates it, as for `Record`."""

    where: str
    value: dict[str, Any] | None = None
    skip: str | None = None


def json_objects(path: str, lines: Iterable[bytes]) -> Iterator[ObjectRecord]:
    """The objects of a `.jsonl` stream, one per non-blank line, or the reason a line holds none. `prepare` and the
    chat datamodules all read lines through this, so a line is skipped under the same reason everywhere."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            yield ObjectRecord(where, skip=INVALID_UTF8)
            continue
        except json.JSONDecodeError:
            yield ObjectRecord(where, skip=BAD_JSON)
            continue
        yield ObjectRecord(where, value) if isinstance(value, dict) else ObjectRecord(where, skip=NOT_AN_OBJECT)


def read_objects(
    spec: str, needs: tuple[str, ...], *, all_columns: bool, not_text: str, missing: str
) -> Iterator[ObjectRecord]:
    """Every JSON object one file input names (a path, glob, folder or URL, as for `prepare --input`, not a
    `builtin:` one: callers say which built-ins they take), in a fixed order.

    A `.jsonl` file gives one object per line (compressed ones decompressed by fsspec); a `.parquet` file one per
    row, holding its columns `needs`, or every column with `all_columns`. A `.txt` file raises DataError
    `not_text` and a parquet file without a column of `needs` raises DataError `missing`, both formatted with the
    file's `path` (and `missing` with its `columns`), so each caller names what its records need.
    """
    for source in expand_input(spec):
        kind, _ = split_name(source.path)
        if kind == ".txt":
            raise DataError(not_text.format(path=source.path))
        try:
            if kind == ".parquet":
                yield from _parquet_objects(source.path, needs, all_columns, missing)
            else:
                yield from _jsonl_objects(source.path)
        except DataError:
            raise
        except (OSError, EOFError, lzma.LZMAError, ValueError) as error:
            raise _unreadable(source.path, error) from None


def _jsonl_objects(path: str) -> Iterator[ObjectRecord]:
    import fsspec

    with fsspec.open(path, "rb", compression="infer") as data:
        yield from json_objects(path, data)


def _parquet_objects(path: str, needs: tuple[str, ...], all_columns: bool, missing: str) -> Iterator[ObjectRecord]:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as raw:
        table = pq.ParquetFile(raw)
        names = table.schema_arrow.names
        if any(column not in names for column in needs):
            raise DataError(missing.format(path=path, columns=", ".join(names)))
        row = 0
        for batch in table.iter_batches(columns=None if all_columns else list(needs), batch_size=1024):
            for value in batch.to_pylist():
                yield ObjectRecord(f"{path}#{row}", value)
                row += 1
