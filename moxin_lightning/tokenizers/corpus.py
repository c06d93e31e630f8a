"""Tokenizer-training text: the same inputs `prepare` reads, streamed line by line.

Files, globs, object-store URLs and `builtin:` corpora are read by `moxin_lightning.data.sources`, so both
commands accept the same `--input` (txt, jsonl optionally compressed, parquet) with the same rules. Nothing is
copied or loaded whole: SentencePiece pulls sentences one at a time through `sentence_iterator`. Documents are
cut at newlines because SentencePiece silently drops sentences longer than `max_sentence_length` bytes; a line is
the natural unit for both prose and code.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


def read_inputs(specs: Iterable[str], text_key: str = "text") -> tuple[Iterator[str], list[dict[str, Any]]]:
    """The documents of every input in order, and one info entry per source (bytes and sha256 once read).

    Globs matching nothing and unsupported files fail here, before training; a record that is not a usable
    document (bad JSON, missing `text_key`, invalid UTF-8) fails when reached: training data is never dropped
    silently. Empty documents, and what the built-in corpora leave out by design (a module without
    docstrings, a file that does not parse), are passed over."""
    from moxin_lightning.data.builtin import NO_DOCSTRINGS, UNPARSEABLE
    from moxin_lightning.data.sources import EMPTY, SourceStats, expand_input

    passed_over = {EMPTY, NO_DOCSTRINGS, UNPARSEABLE}

    sources = [source for spec in specs for source in expand_input(spec, text_key)]
    info: list[dict[str, Any]] = [{"path": source.path} for source in sources]

    def texts() -> Iterator[str]:
        for source, entry in zip(sources, info, strict=True):
            stats = SourceStats(label=source.label, path=source.path)
            for record in source.read(stats):
                if record.skip in passed_over:
                    continue
                if record.skip is not None:
                    raise ValueError(f"{record.where}: {record.skip}; fix or remove it (and check --text_key)")
                yield record.text
            entry.update(bytes=stats.bytes, sha256=stats.digest.hexdigest())

    return texts(), info


def iter_lines(texts: Iterable[str]) -> Iterator[str]:
    """The non-empty lines of each text (the sentences SentencePiece trains on)."""
    for text in texts:
        for line in text.split("\n"):
            if line:
                yield line
