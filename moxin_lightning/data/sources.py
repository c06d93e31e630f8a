"""Input sources for `prepare`: what a `--input` names, and the documents each one holds.

An `--input` is a local path, a glob, a folder, an fsspec URL (`s3://bucket/shards/*.jsonl.gz`, read through
`fsspec.open`, so any store with credentials configured works) or `builtin:<name>` (see `builtin.py`).
`hf://datasets/<org>/<name>/<path or glob>` reads a Hugging Face dataset repository in place through
`huggingface_hub`'s `HfFileSystem` (fsspec finds it once `huggingface_hub` is installed; gated or private sets need
a token: `HF_TOKEN` or `huggingface-cli login`).
It expands, in the main process, into a list of *sources*: small picklable descriptions of one unit of
work. Workers call `source.read(stats)` and get `Record`s back, in a fixed order, so the same inputs always
give the same documents in the same order.

Every record a source holds comes back either as a document or as a skip with its reason: nothing is dropped
silently, and the reasons are counted per source in the manifest. A problem that makes a whole file unusable
(it cannot be opened, a compressed stream is corrupt, a parquet file lacks the column) raises `DataError`,
whose message is one line naming the file and the fix.

Formats, by file name (a `.gz`, `.bz2`, `.xz` or `.zst` suffix on `.txt`/`.jsonl`/`.json` means compressed;
every frame or member of a compressed file is read, and a file cut short is an error, not fewer records):
  * `.txt`     one document per file, the whole file;
  * `.jsonl`   one JSON object per line, the document in field `text_key`; blank lines are not records;
  * `.json`    one JSON array of objects (e.g. DeepScaleR's `deepscaler.json`), each element a record, streamed
               element by element; or, when the file's first non-space byte is not `[`, JSON lines as `.jsonl`;
  * `.parquet` one document per row, column `text_key`.

Structured records (chat conversations, preference pairs) come from the same inputs as whole JSON objects through
`read_objects`, which judges a `.jsonl` line (`json_objects`) or a `.json` array element (`json_file_objects`) by
the same rules and skips under the same reasons.
"""

from __future__ import annotations

import bz2
import codecs
import glob as globlib
import gzip
import hashlib
import io
import itertools
import json
import lzma
import re
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

FORMATS = (".txt", ".jsonl", ".json", ".parquet")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
SUPPORTED = ".txt, .jsonl, .json (optionally .gz/.bz2/.xz/.zst) or .parquet"
_MAX_EXAMPLES = 5  # skipped-record locations kept per source, to find them again
_CHUNK = 1 << 20  # bytes read at a time


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
    """The decompressed stream, readable by lines. Every gzip member, bz2 / xz stream and zstd frame is read, and a
    stream cut short raises EOFError (zstandard's own readers stop after the first frame, or end silently)."""
    if compression == ".gz":
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if compression == ".bz2":
        return bz2.BZ2File(stream)
    if compression == ".xz":
        return lzma.LZMAFile(stream)
    if compression == ".zst":
        return io.BufferedReader(_ZstdReader(stream), buffer_size=_CHUNK)
    return stream


class _ZstdReader(io.RawIOBase):
    """Decompresses a zstd stream frame after frame (multi-frame files, such as those of parallel compressors,
    included); a stream that ends inside a frame raises EOFError, and a corrupt one OSError, as gzip does."""

    def __init__(self, raw: IO[bytes]) -> None:
        import zstandard

        self.raw, self.errors = raw, zstandard.ZstdError
        self.context = zstandard.ZstdDecompressor()
        self.frame: Any = None  # the decompressor of the current frame
        self.unused = b""  # input past the end of the last frame
        self.output, self.offset = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self.offset == len(self.output):
            if not self._decompress_more():
                return 0
        size = min(len(buffer), len(self.output) - self.offset)
        buffer[:size] = self.output[self.offset : self.offset + size]
        self.offset += size
        return size

    def _decompress_more(self) -> bool:
        data, self.unused = self.unused or self.raw.read(1 << 16), b""
        if not data:
            if self.frame is not None and not self.frame.eof:
                raise EOFError("the zstd stream ends inside a frame (a truncated file)")
            return False
        if self.frame is None or self.frame.eof:
            self.frame = self.context.decompressobj()
        try:
            self.output, self.offset = self.frame.decompress(data), 0
        except self.errors as error:
            raise OSError(f"corrupt zstd data: {error}") from None
        if self.frame.eof:
            self.unused = self.frame.unused_data
        return True


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
                data = _decompress(io.BufferedReader(hashing, buffer_size=_CHUNK), compression)
                if kind == ".txt":
                    yield decoded(self.path, data.read())
                else:
                    yield from self._documents(_objects(self.path, kind, data))
                hashing.drain()
        except DataError:
            raise
        except (OSError, EOFError, lzma.LZMAError, ValueError) as error:
            raise _unreadable(self.path, error) from None

    def _documents(self, objects: Iterable[ObjectRecord]) -> Iterator[Record]:
        for found in objects:
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
    return DataError(f"cannot read {path}: {_first_line(error)}; fix or remove the file")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def refuse_repeats(listed: list[str], found: list[str]) -> None:
    """DataError (one line, before any work) when a file of `found` is already in `listed`: two --input naming one
    file, or a glob and a path that overlap, would read and tokenize it twice. `prepare` (documents) and the record
    formats (`prepare_records.plan_units`) both check here. Local paths are compared resolved (`./a` is `a`)."""
    seen = {_same_file(path) for path in listed}
    for path in found:
        if _same_file(path) in seen:
            raise DataError(f"--input {path} is listed twice; each file is read once, so pass it once")


def _same_file(path: str) -> str:
    import os

    return path if "://" in path or path.startswith("builtin") else os.path.realpath(path)


def expand_input(spec: str, text_key: str = "text") -> list[Source]:
    """The sources one `--input` names, in a fixed order (glob matches sorted); DataError if it names nothing."""
    if spec.startswith("builtin:"):
        from moxin_lightning.data.builtin import expand_builtin, local_parts

        return [part for one in local_parts(spec) for part in expand_builtin(one)]  # builtin:local: both corpora
    import fsspec.core

    try:
        fs, path = fsspec.core.url_to_fs(spec)
    except (ImportError, ValueError) as error:  # an unknown protocol, or its package missing
        hint = " (hf:// needs pip install huggingface_hub)" if spec.startswith("hf://") else ""
        raise DataError(f"--input {spec}: fsspec cannot open it: {_first_line(error)}{hint}") from None
    try:
        return _file_sources(spec, fs, path, text_key)
    except OSError as error:  # e.g. a store refusing access: a gated dataset without a token
        hint = "; gated Hugging Face datasets need HF_TOKEN" if spec.startswith("hf://") else ""
        raise DataError(
            f"--input {spec} cannot be listed: {_first_line(error)}; check the URL and credentials{hint}"
        ) from None


def _file_sources(spec: str, fs: Any, path: str, text_key: str) -> list[Source]:
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


def _objects(path: str, kind: str, data: IO[bytes]) -> Iterator[ObjectRecord]:
    """The objects of a decompressed `.jsonl` or `.json` stream."""
    return json_objects(path, data) if kind == ".jsonl" else json_file_objects(path, data)


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


def json_file_objects(path: str, data: IO[bytes]) -> Iterator[ObjectRecord]:
    """The objects of a `.json` stream: the elements of one JSON array when its first non-space byte is `[`
    (located `path[index]`, from 0), otherwise one object per line as in `.jsonl` (`json_objects`).

    An array is streamed: memory holds the element being read and about 1 MB of input (at most twice the largest
    element), never the whole file, so DeepScaleR's `deepscaler.json` or a multi-GB array reads in constant
    memory. An element that is not an object is skipped as `NOT_AN_OBJECT`, one with undecodable bytes as
    `INVALID_UTF8`; a broken array (bad syntax, a cut-off end, data after the closing `]`) cannot be resynchronised,
    so it raises ValueError naming the element, which readers turn into a one-line DataError for the file.
    """
    head = b""
    while not (start := head.lstrip(b" \t\r\n")):
        chunk = data.read(1 << 16)
        if not chunk:
            return  # empty, or only whitespace: no records
        head += chunk
    if start.startswith(b"["):
        yield from _JsonArray(path, data, head)
    else:
        yield from json_objects(path, io.BufferedReader(_Prefixed(head, data), buffer_size=_CHUNK))


class _Prefixed(io.RawIOBase):
    """`head` followed by the rest of `data`: a stream whose first bytes were read to look at them."""

    def __init__(self, head: bytes, data: IO[bytes]) -> None:
        self.head, self.data = head, data

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self.head:
            chunk = self.data.read(len(buffer))
            buffer[: len(chunk)] = chunk
            return len(chunk)
        size = min(len(buffer), len(self.head))
        buffer[:size], self.head = self.head[:size], self.head[size:]
        return size


_SPACE = re.compile(r"[ \t\n\r]*")
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what the surrogateescape decoder makes of bytes that are not UTF-8


class _JsonArray:
    """The elements of one JSON array read from a binary stream, one at a time (see `json_file_objects`)."""

    def __init__(self, path: str, data: IO[bytes], head: bytes) -> None:
        self.path, self.data = path, data
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.parser = json.JSONDecoder()
        self.text, self.at, self.ended = self.decoder.decode(head), 0, False

    def __iter__(self) -> Iterator[ObjectRecord]:
        self._next_char()
        self.at += 1  # the opening "[", checked by the caller
        if self._next_char() == "]":
            self.at += 1
        else:
            for index in itertools.count():
                value, undecodable = self._element(index)
                where = f"{self.path}[{index}]"
                if undecodable:
                    yield ObjectRecord(where, skip=INVALID_UTF8)
                elif not isinstance(value, dict):
                    yield ObjectRecord(where, skip=NOT_AN_OBJECT)
                else:
                    yield ObjectRecord(where, value)
                after = self._next_char()
                self.at += 1
                if after == "]":
                    break
                if after != ",":
                    found = repr(after) if after else "the end of the file (is it cut short?)"
                    raise ValueError(f"JSON array: expected ',' or ']' after element {index}, found {found}")
        if self._next_char():
            raise ValueError("JSON array: data after its closing ']'")

    def _read_more(self) -> bool:
        """Append more decoded text (dropping what was consumed); False at the end of the stream. Reads at least
        as much as is pending, so an element larger than a chunk is parsed O(log size) times, not O(size)."""
        while not self.ended:
            chunk = self.data.read(max(_CHUNK, len(self.text) - self.at))
            self.ended = not chunk
            added = self.decoder.decode(chunk, final=self.ended)
            if added:
                self.text, self.at = self.text[self.at :] + added, 0
                return True
        return False

    def _next_char(self) -> str:
        """The next character that is not JSON whitespace, left unconsumed; '' at the end of the stream."""
        while True:
            self.at = _SPACE.match(self.text, self.at).end()
            if self.at < len(self.text):
                return self.text[self.at]
            if not self._read_more():
                return ""

    def _element(self, index: int) -> tuple[Any, bool]:
        """The next element, and whether its text held bytes that are not UTF-8."""
        self._next_char()
        while True:
            try:
                value, end = self.parser.raw_decode(self.text, self.at)
            except json.JSONDecodeError as error:
                if self._read_more():
                    continue  # perhaps only cut at the end of what was read so far
                raise ValueError(f"JSON array element {index}: {error.msg}") from None
            if end < len(self.text) or not self._read_more():  # a number at the end of the text may go on
                undecodable = _UNDECODABLE.search(self.text, self.at, end) is not None
                self.at = end
                return value, undecodable


Columns = tuple[str | tuple[str, ...], ...]  # column names; a tuple inside: alternatives, at least one present


def read_objects(
    spec: str, needs: Columns, *, all_columns: bool, not_text: str, missing: str, optional: tuple[str, ...] = ()
) -> Iterator[ObjectRecord]:
    """Every JSON object one file input names (a path, glob, folder or URL, as for `prepare --input`, not a
    `builtin:` one: callers say which built-ins they take), in a fixed order.

    A `.jsonl` file gives one object per line; a `.json` file the elements of its JSON array (or its lines, see
    `json_file_objects`), both optionally compressed; a `.parquet` file one per row, holding its columns `needs`
    (an entry that is a tuple of names: those of them the file has, at least one) and those of `optional` it has,
    or every column with `all_columns` (list and struct columns come back as lists and dicts). A `.txt` file raises
    DataError `not_text` and a parquet file without a column of `needs` raises DataError `missing`, both formatted
    with the file's `path` (and `missing` with its `columns`), so each caller names what its records need.
    """
    for source in expand_input(spec):
        kind, _ = split_name(source.path)
        if kind == ".txt":
            raise DataError(not_text.format(path=source.path))
        try:
            if kind == ".parquet":
                yield from _parquet_objects(source.path, needs, optional, all_columns, missing)
            else:
                yield from _json_objects(source.path, kind)
        except DataError:
            raise
        except (OSError, EOFError, lzma.LZMAError, ValueError) as error:
            raise _unreadable(source.path, error) from None


def _json_objects(path: str, kind: str) -> Iterator[ObjectRecord]:
    import fsspec

    _, compression = split_name(path)
    with fsspec.open(path, "rb") as raw:
        yield from _objects(path, kind, _decompress(raw, compression))


def _parquet_objects(
    path: str, needs: Columns, optional: tuple[str, ...], all_columns: bool, missing: str
) -> Iterator[ObjectRecord]:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as raw:
        table = pq.ParquetFile(raw)
        names = table.schema_arrow.names
        read: list[str] = []
        for need in needs:
            present = [column for column in ((need,) if isinstance(need, str) else need) if column in names]
            if not present:
                raise DataError(missing.format(path=path, columns=", ".join(names)))
            read.extend(present)
        read.extend(column for column in optional if column in names and column not in read)
        row = 0
        for batch in table.iter_batches(columns=None if all_columns else read, batch_size=1024):
            for value in batch.to_pylist():
                yield ObjectRecord(f"{path}#{row}", value)
                row += 1
