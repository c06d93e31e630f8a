"""A real local corpus every Python installation has, so `prepare` (and the CPU demo) needs no download.

`--input builtin:local` is both corpora below, code then prose (caps apply to each).

Both are read from the running interpreter's standard library only (`sysconfig`'s 'stdlib' path), never from
installed packages: the corpus is a fixed function of the Python version, so the same command gives the same
data, tokenizer and loss curve on any machine with the same Python, whatever else is installed. `corpus_fingerprint`
names it (the sha256 that `prepare` records for the input in `manifest.json`).

`--input builtin:code` is Python source code: every `.py` file under 'stdlib', one document per file, ordered by
path relative to it. Folders named `test`, `tests` or `idle_test` are left out: they are a third of the
standard library and full of deliberately odd code (fixtures with bad encodings, syntax errors); folders named
`site-packages` / `dist-packages` are left out because installed packages vary between environments;
`__pycache__` holds no source. Empty files (many `__init__.py`) and files that are not UTF-8 are counted as
skipped.

`--input builtin:prose` is English prose, in this order:
  1. the pydoc topics (`pydoc_data.topics.topics`, the language reference sections `help()` shows), by key;
  2. the docstrings of every standard-library module (module, classes and functions, in source order, found
     by parsing the files with `ast`; nothing is imported), by path like `builtin:code`. A module without
     docstrings and a file that does not parse are counted as skipped.

A query caps the size, cutting the ordered list at a prefix: `builtin:code?max_mb=20` (MB = 10**6 bytes) and/or
`max_documents=N`. For code the cap counts candidate files and their size on disk; for prose it counts documents
and their UTF-8 bytes. Example: `builtin:prose?max_mb=2`, `builtin:code?max_documents=500`.
"""

from __future__ import annotations

import ast
import hashlib
import os
import platform
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from moxin_lightning.data.sources import DataError, Record, SourceStats, checked, decoded

NAMES = ("code", "prose")
SKIPPED_DIRS = frozenset({"__pycache__", "test", "tests", "idle_test"})
SITE_DIRS = frozenset({"site-packages", "dist-packages"})
NO_DOCSTRINGS = "no docstrings"
UNPARSEABLE = "unparseable Python"
PART_BYTES = 1 << 20  # size of one unit of work: workers share the corpus in parts of about this size


@dataclass(frozen=True)
class CodePart:
    """Some source files of `builtin:code`, read in a worker: (where, absolute path) in order."""

    label: str
    files: tuple[tuple[str, str], ...]

    @property
    def path(self) -> str:
        return f"{self.label} {self.files[0][0]} .. {self.files[-1][0]}"

    def read(self, stats: SourceStats) -> Iterator[Record]:
        for where, path in self.files:
            try:
                data = Path(path).read_bytes()
            except OSError as error:
                raise DataError(f"cannot read {path} of {self.label}: {error.strerror}; rerun prepare") from None
            stats.update(data)
            stats.digest.update(b"\0")
            yield decoded(where, data)


@dataclass(frozen=True)
class ProsePart:
    """Some records of `builtin:prose`, already extracted in the main process (the whole corpus is a few MB)."""

    label: str
    records: tuple[Record, ...]

    @property
    def path(self) -> str:
        return f"{self.label} {self.records[0].where} .. {self.records[-1].where}"

    def read(self, stats: SourceStats) -> Iterator[Record]:
        for record in self.records:
            if record.text is not None:
                stats.update(record.text.encode("utf-8"))
                stats.digest.update(b"\0")
            yield record


def parse_spec(spec: str) -> tuple[str, int | None, int | None]:
    """'builtin:prose?max_mb=2&max_documents=10' -> ('prose', 2_000_000, 10); DataError on anything else."""
    name, _, query = spec.removeprefix("builtin:").partition("?")
    if name not in NAMES:
        choices = ", ".join(f"builtin:{n}" for n in ("local", *NAMES))
        raise DataError(f"unknown {spec}: the built-in corpora are {choices}")
    caps: dict[str, float] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in ("max_mb", "max_documents"):
            raise DataError(f"unknown option {key!r} in {spec}: use max_mb=<MB> and/or max_documents=<N>")
        try:
            caps[key] = float(value)
        except ValueError:
            raise DataError(f"{key}={value!r} in {spec} is not a number") from None
    max_bytes = int(caps["max_mb"] * 1_000_000) if "max_mb" in caps else None
    max_documents = int(caps["max_documents"]) if "max_documents" in caps else None
    return name, max_bytes, max_documents


def local_parts(spec: str) -> list[str]:
    """`builtin:local[?caps]` is both corpora (code, then prose, each with the caps); other specs stay as they are."""
    name, _, query = spec.removeprefix("builtin:").partition("?")
    if name != "local":
        return [spec]
    suffix = f"?{query}" if query else ""
    return [f"builtin:{corpus}{suffix}" for corpus in NAMES]


def expand_builtin(spec: str) -> list[CodePart] | list[ProsePart]:
    """The parts of one `builtin:` input, each about `PART_BYTES`, in corpus order."""
    name, max_bytes, max_documents = parse_spec(spec)
    if name == "code":
        files = [(where, path, os.path.getsize(path)) for where, path in code_files()]
        kept = _prefix(files, lambda item: item[2], max_bytes, max_documents)
        return [CodePart(spec, tuple((w, p) for w, p, _ in part)) for part in _parts(kept, lambda item: item[2])]
    records = _capped_prose(prose_records(), max_bytes, max_documents)
    return [ProsePart(spec, tuple(part)) for part in _parts(records, _text_bytes)]


def iter_documents(spec: str) -> Iterator[Record]:
    """Every record of a `builtin:` input in order, read in this process (for inspection and tests)."""
    for part in expand_builtin(spec):
        yield from part.read(SourceStats(spec, part.path))


def stdlib_root() -> Path:
    """The standard library folder that both corpora read."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def python_files(root: Path, *, skip_site: bool) -> list[tuple[str, Path]]:
    """(posix path relative to `root`, path) of the .py files under `root`, sorted by relative path."""
    skipped = SKIPPED_DIRS | SITE_DIRS if skip_site else SKIPPED_DIRS
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skipped]
        for file in files:
            if file.endswith(".py"):
                path = Path(folder, file)
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def code_files() -> list[tuple[str, str]]:
    """(where, path) of every `builtin:code` document, in corpus order; `where` is 'stdlib/relative/path.py'."""
    return [(f"stdlib/{relative}", str(path)) for relative, path in python_files(stdlib_root(), skip_site=True)]


def prose_records() -> Iterator[Record]:
    """Every record of `builtin:prose` in corpus order, produced lazily (the docstrings take seconds to parse)."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield checked(f"pydoc:topics/{key}", topics[key])
    for relative, path in python_files(stdlib_root(), skip_site=True):
        yield module_docstrings(f"docstrings:{relative}", path)


def corpus_fingerprint(spec: str) -> dict[str, object]:
    """What a `builtin:` input is on this interpreter: {"input", "python", "documents", "sha256"}.

    `sha256` is the one `prepare` records for the input in its manifest (the sha256 of its parts' sha256 hex
    digests, each followed by a newline; a part's digest covers its documents' UTF-8 bytes, each followed by a
    NUL byte), so a prepared dataset and this function name the same text."""
    digests, documents = [], 0
    for part in [part for one in local_parts(spec) for part in expand_builtin(one)]:
        stats = SourceStats(spec, part.path)
        documents += sum(record.text is not None for record in part.read(stats))
        digests.append(stats.digest.hexdigest())
    sha256 = hashlib.sha256("".join(digest + "\n" for digest in digests).encode()).hexdigest()
    return {"input": spec, "python": platform.python_version(), "documents": documents, "sha256": sha256}


def module_docstrings(where: str, path: str | Path) -> Record:
    """The docstrings of one module, in source order, each under a line naming its module, class or function."""
    try:
        tree = ast.parse(Path(path).read_bytes(), filename=str(path))  # bytes: honours the coding cookie
    except (SyntaxError, ValueError):
        return Record(where, skip=UNPARSEABLE)
    module = where.removeprefix("docstrings:").removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    blocks = []
    if doc := ast.get_docstring(tree):
        blocks.append(f"module {module}\n\n{doc}")
    blocks.extend(f"{kind} {module}.{name}\n\n{doc}" for kind, name, doc in _definitions(tree.body, ""))
    if not blocks:
        return Record(where, skip=NO_DOCSTRINGS)
    return checked(where, "\n\n".join(blocks))


def _definitions(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, str, str]]:
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = prefix + node.name
            if doc := ast.get_docstring(node):
                yield ("class" if isinstance(node, ast.ClassDef) else "function"), name, doc
            yield from _definitions(node.body, name + ".")


def _text_bytes(record: Record) -> int:
    return len(record.text.encode("utf-8")) if record.text is not None else 0


def _prefix(items: list, size, max_bytes: int | None, max_documents: int | None) -> list:
    kept, total = [], 0
    for item in items:
        if (max_documents is not None and len(kept) >= max_documents) or (
            max_bytes is not None and total + size(item) > max_bytes
        ):
            break
        kept.append(item)
        total += size(item)
    return kept


def _capped_prose(records: Iterator[Record], max_bytes: int | None, max_documents: int | None) -> list[Record]:
    """The prefix of the prose records within the caps; skips before the cut are kept (they are counted)."""
    kept, documents, total = [], 0, 0
    for record in records:
        size = _text_bytes(record)
        if record.text is not None:
            if (max_documents is not None and documents >= max_documents) or (
                max_bytes is not None and total + size > max_bytes
            ):
                break
            documents += 1
            total += size
        kept.append(record)
    return kept


def _parts(items: list, size) -> Iterator[list]:
    """Consecutive groups of about `PART_BYTES` each (never empty)."""
    part, total = [], 0
    for item in items:
        part.append(item)
        total += size(item)
        if total >= PART_BYTES:
            yield part
            part, total = [], 0
    if part:
        yield part


def cache_key(spec: str) -> str:
    """A name for what an input holds, for caches: a `builtin:` corpus is a function of the Python version (see
    the module docstring), so its cached tokenizer and prepared data are keyed by it; other inputs are their spec."""
    return f"{spec}-python{platform.python_version()}" if spec.startswith("builtin:") else spec
