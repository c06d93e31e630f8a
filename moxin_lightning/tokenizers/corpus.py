"""Tokenizer-training text, streamed line by line from .txt / .jsonl files or from an iterator of strings.

Nothing is copied or loaded whole: SentencePiece pulls sentences one at a time through `sentence_iterator`,
so a corpus of any size on disk costs no temporary copy. Documents are cut at newlines because SentencePiece
silently drops sentences longer than `max_sentence_length` bytes; a line is the natural unit for both prose
and code.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

SUFFIXES = (".txt", ".jsonl")


def expand_globs(patterns: Iterable[str]) -> list[Path]:
    """The files matching each glob (`**` recurses), sorted, without repeats; any glob matching nothing is an error."""
    files: dict[Path, None] = {}
    for pattern in patterns:
        matches = sorted(Path(match) for match in glob.glob(str(pattern), recursive=True) if Path(match).is_file())
        if not matches:
            raise ValueError(
                f"no input files match {str(pattern)!r}; check the path (quote globs so the shell does not expand them)"
            )
        for path in matches:
            if path.suffix not in SUFFIXES:
                raise ValueError(
                    f"input {path} is neither .txt (one text per line) nor .jsonl (one JSON object per line); "
                    "convert it or narrow the glob"
                )
            files[path] = None
    return list(files)


def iter_texts(files: Iterable[Path], text_key: str = "text") -> Iterator[str]:
    """Each document of each file, in order: a .txt line, or a .jsonl record's `text_key` field."""
    for path in files:
        try:
            yield from _read(path, text_key)
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not valid UTF-8 text; re-encode it as UTF-8") from None


def _read(path: Path, text_key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        if path.suffix == ".txt":
            for line in handle:
                yield line.rstrip("\r\n")
            return
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path} line {number} is not valid JSON; fix or remove that line") from None
            text = record.get(text_key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path} line {number} has no string field {text_key!r}; pass the right --text_key")
            yield text


def iter_lines(texts: Iterable[str]) -> Iterator[str]:
    """The non-empty lines of each text (the sentences SentencePiece trains on)."""
    for text in texts:
        for line in text.split("\n"):
            if line:
                yield line
