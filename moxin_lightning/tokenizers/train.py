"""Train a SentencePiece BPE tokenizer the way Mistral-7B's (= Moxin's) was trained, or the MoE tokenizer's CJK expert.

The defaults copy the trainer spec stored inside Mistral-7B's `tokenizer.model`: BPE, byte fallback (no text
is ever <unk>), identity normalization and no whitespace removal (text and code round-trip exactly), digits
split one by one, <unk>=0 <s>=1 </s>=2, no pad piece. A tokenizer trained here therefore drops in wherever the
32K base tokenizer is used.

`expert="cjk"` trains the CJK expert of `MoETokenizer` instead: it sees only the CJK runs the router cuts out
of the text (so its whole vocabulary is spent on CJK), and it has no <s>/</s> and no dummy-prefix space of its
own, because it only ever encodes runs inside a text whose specials come from the base expert. It keeps
byte fallback so that a CJK character it never saw still round-trips.

The corpus is streamed to SentencePiece (no temporary copy), the output folder is written under a temporary
name and renamed, and `tokenizer_info.json` records how the tokenizer was made.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sentencepiece as spm

from moxin_lightning.atomic import written_as_a_whole
from moxin_lightning.tokenizers.corpus import iter_lines, read_inputs
from moxin_lightning.tokenizers.router import CJK, ROUTING_VERSION, cjk_runs

EXPERTS = (CJK,)
BYTE_PIECES = 256
# Options that train_tokenizer itself decides; passing them through **options would break the output.
_OWN_OPTIONS = {"input", "model_prefix", "sentence_iterator", "model_writer", "vocab_size"}


def default_options(vocab_size: int, expert: str | None = None) -> dict[str, Any]:
    """SentencePiece trainer options: Mistral-7B's trainer spec, adjusted for an expert."""
    options: dict[str, Any] = dict(
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        split_by_number=True,
        max_sentencepiece_length=16,
        max_sentence_length=4192,
        character_coverage=0.99995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=True,
        num_threads=os.cpu_count() or 1,
        minloglevel=1,
    )
    if expert == CJK:
        # SentencePiece's recommended coverage for CJK; rarer characters fall back to bytes. The whitespace
        # marker must be a piece even if the corpus has no spaces between CJK characters: byte-fallback bytes
        # of "▁" would decode as U+2581, not as a space.
        options.update(add_dummy_prefix=False, bos_id=-1, eos_id=-1, character_coverage=0.9995, required_chars="\u2581")
    return options


def min_vocab_size(options: dict[str, Any]) -> int:
    """Byte fallback's 256 pieces, the special pieces, and at least one learned piece."""
    specials = sum(options[key] >= 0 for key in ("unk_id", "bos_id", "eos_id", "pad_id"))
    return BYTE_PIECES + specials + 1


def train_tokenizer(
    inputs: str | list[str] | tuple[str, ...] | Iterable[str],
    vocab_size: int,
    output: str | Path,
    *,
    expert: str | None = None,
    text_key: str = "text",
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> Path:
    """Train a BPE tokenizer and write `output/tokenizer.model` and `output/tokenizer_info.json`.

    inputs: a file, glob, URL or `builtin:` corpus, or a list of them, read as `prepare` reads them (.txt,
        .jsonl with the text in `text_key`, optionally compressed, .parquet); any other iterable (a generator, a
        dataset column) is taken as the texts themselves.
    expert: None for a base tokenizer; "cjk" for the MoE tokenizer's CJK expert (trained on CJK runs only).
    overwrite: replace an existing non-empty `output` folder (refused otherwise).
    progress: report sentences read on stderr.
    options: SentencePiece trainer options overriding `default_options` (e.g. `input_sentence_size=2_000_000`
        to sample a huge corpus, `minloglevel=2` to silence SentencePiece's own log).
    Returns the output folder.
    """
    if expert is not None and expert not in EXPERTS:
        raise ValueError(f"unknown expert {expert!r}; choose one of: {', '.join(EXPERTS)} (or None for a base model)")
    clash = sorted(_OWN_OPTIONS & options.keys())
    if clash:
        raise ValueError(f"option(s) {', '.join(clash)} are set by train_tokenizer itself; remove them")
    spm_options = {**default_options(vocab_size, expert), **options}
    smallest = min_vocab_size(spm_options)
    if vocab_size < smallest:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte fallback needs {BYTE_PIECES} byte pieces plus the special "
            f"pieces, so use at least {smallest} (real tokenizers use 8000-64000)"
        )
    output = Path(output)
    _check_output(output, overwrite)
    texts, inputs_info = _open_inputs(inputs, text_key)

    sentences: Iterator[str] = iter_lines(texts)
    if expert == CJK:
        sentences = (run for line in sentences for run in cjk_runs(line))
    first = next(sentences, None)
    if first is None:
        what = "no CJK text (Han, kana, Hangul)" if expert == CJK else "no text"
        raise ValueError(f"the inputs hold {what} to train on; check the files (and --text_key for .jsonl)")
    counter = _Counter(itertools.chain([first], sentences), progress)

    started = time.monotonic()
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=counter, model_writer=model, **spm_options)
    except RuntimeError as error:
        if counter.error is not None:  # our own reader failed inside SentencePiece's loop: report that error
            raise counter.error from None
        raise ValueError(_explain(error, vocab_size)) from None

    info = {
        "kind": "sentencepiece-bpe",
        "expert": expert,
        "vocab_size": vocab_size,
        "inputs": inputs_info,
        "text_key": text_key,
        "sentences": counter.count,
        "characters": counter.characters,
        "options": spm_options,
        "sentencepiece_version": spm.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "train_seconds": round(time.monotonic() - started, 2),
        "sha256": hashlib.sha256(model.getvalue()).hexdigest(),
    }
    if expert is not None:
        info["routing_version"] = ROUTING_VERSION
    _write_atomically(output, {"tokenizer.model": model.getvalue(), "tokenizer_info.json": _json_bytes(info)})
    if progress:
        print(f"train-tokenizer: wrote {output / 'tokenizer.model'} ({vocab_size:,} pieces)", file=sys.stderr)
    return output


def _open_inputs(inputs: Any, text_key: str) -> tuple[Iterator[str], list[dict[str, Any]]]:
    """Globs (a str, list or tuple) become a stream over the matching files; any other iterable is the texts."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError("no inputs given; pass at least one file, glob or builtin: corpus (--input)")
        return read_inputs(inputs, text_key)
    if not isinstance(inputs, Iterable):
        raise ValueError(f"inputs must be globs or an iterable of strings, not {type(inputs).__name__}")
    return _only_strings(inputs), [{"iterator": type(inputs).__name__}]


def _only_strings(texts: Iterable[Any]) -> Iterator[str]:
    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"the input iterator yielded a {type(text).__name__}, not a string; yield the texts")
        yield text


class _Counter:
    """Passes sentences to SentencePiece, counting them and reporting progress on stderr every few seconds.

    An exception raised while reading is kept: SentencePiece turns it into a generic RuntimeError, and the
    caller re-raises the original one-line error instead.
    """

    interval_s = 2.0

    def __init__(self, sentences: Iterator[str], enabled: bool) -> None:
        self.sentences, self.enabled = sentences, enabled
        self.count = self.characters = 0
        self.error: Exception | None = None
        self.done = False
        self._next_report = time.monotonic() + self.interval_s

    def __iter__(self) -> _Counter:
        return self

    def __next__(self) -> str:
        try:
            sentence = next(self.sentences)
        except StopIteration:
            if not self.done:
                self.done = True
                self.report(final=True)
            raise
        except Exception as error:
            self.error = error
            raise
        self.count += 1
        self.characters += len(sentence)
        if self.enabled and time.monotonic() >= self._next_report:
            self.report()
            self._next_report = time.monotonic() + self.interval_s
        return sentence

    def report(self, final: bool = False) -> None:
        if not self.enabled:
            return
        line = f"train-tokenizer: {self.count:,} sentences ({self.characters:,} characters) read"
        print(line + ("; training" if final else " ..."), file=sys.stderr, flush=True)


def _explain(error: RuntimeError, vocab_size: int) -> str:
    """SentencePiece's C++ check failure (file, line, condition, message) as one line that says what to change."""
    text = str(error).strip()
    message = text.splitlines()[0].split("] ", 1)[-1] if text else repr(error)
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return (
            f"vocab_size={vocab_size} is more than this corpus supports (at most {too_high.group(2)} pieces); "
            "lower --vocab_size or add text"
        )
    too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_small:
        return (
            f"vocab_size={vocab_size} cannot hold the corpus's characters and special pieces ({too_small.group(2)} "
            "needed); raise --vocab_size or pass a lower character_coverage"
        )
    return f"sentencepiece could not train: {message}"


def _check_output(output: Path, overwrite: bool) -> None:
    """Refuse before any work is spent: a file where the folder should go, or a filled folder without overwrite."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; name a folder to write tokenizer.model into")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"--output {output} already exists; pass overwrite=True (--overwrite) or choose another")


def _write_atomically(output: Path, files: dict[str, bytes]) -> None:
    """Write the folder under a temporary name next to `output`, then rename it into place."""
    with written_as_a_whole(output) as staging:
        for name, data in files.items():
            (staging / name).write_bytes(data)


def _json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train-tokenizer` subcommand to a CLI's subparsers (moxin_lightning.cli wires it in)."""
    parser = subparsers.add_parser(
        "train-tokenizer",
        help="train a Mistral-style SentencePiece BPE tokenizer, or the MoE tokenizer's CJK expert",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "--input", action="append", required=True, metavar="GLOB",
        help="a .txt/.jsonl[.gz]/.parquet file, glob (quoted) or builtin:local, as for prepare; repeat for several",
    )  # fmt: skip
    parser.add_argument("--vocab_size", type=int, required=True, help="pieces in the model (base: 32000)")
    parser.add_argument("--output", required=True, help="folder to write tokenizer.model and tokenizer_info.json into")
    parser.add_argument("--expert", choices=EXPERTS, default=None, help="train this MoE-tokenizer expert instead")
    parser.add_argument("--text_key", default="text", help="field of a .jsonl record holding the text")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> None:
    try:
        options = dict(expert=args.expert, text_key=args.text_key, overwrite=args.overwrite)
        path = train_tokenizer(args.input, args.vocab_size, args.output, **options)
    except ValueError as error:
        sys.exit(f"train-tokenizer: error: {error}")
    print(path / "tokenizer.model")
