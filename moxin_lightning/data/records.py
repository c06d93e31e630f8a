"""What the three instruction formats (chat, preference, prompts) share: reading records, the held-out split, the
template's identity, batched template encoding, and the per-split counts a prepared folder's manifest carries.

A *record format* (`chat_records.ChatFormat`, `preference_records.PreferenceFormat`,
`prompt_records.PromptFormat`) turns JSON objects into litdata items (dicts of numpy arrays and strings). `prepare
--format chat|preference|prompts` runs it in litdata workers over files, and the datamodules stream the items back;
raw files named in a datamodule's `train` are prepared through exactly the same code on first use, so there is one
encoder per stage.

A format encodes a *batch* of records at once: the template lays each conversation out with a recording tokenizer
that notes every text piece (`PieceRecorder`), then the real tokenizer encodes all pieces of the batch in one
`encode_batch` call (sentencepiece's C++ loop, not one Python call per message), and the pieces' ids are put back
in place. The ids are the ones `template.encode(tokenizer, messages)` gives, piece for piece (tested).

This module does not import Lightning.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from moxin_lightning.data.sources import Columns, DataError, ObjectRecord, expand_input, read_objects, split_name
from moxin_lightning.tokenizers.base import Tokenizer
from moxin_lightning.tokenizers.chat import ChatTemplate

MAX_EXAMPLES = 5  # skipped-record locations kept per split
RECORD_SPLIT_RULE = (
    "val when int.from_bytes(sha256(f'{seed}\\n'.encode() + '\\x1e'.join(f'{role}\\x1f{content}' for each turn of "
    "key).encode())[:8], 'big') / 2**64 < val_fraction; key = the conversation (chat), the prompt turns "
    "(preference, prompts)"
)

Messages = list[dict[str, str]]
# Every built-in corpus prefix (documents, chat, pairs, prompts): an input starting with one is no file path.
BUILTIN_PREFIXES = ("builtin:", "builtin-chat:", "builtin-pairs:", "builtin-prompts:")


# ------------------------------------------------------------------------------------------------- the split


def record_hash(key: Messages, seed: int = 0) -> int:
    """The 64-bit value `RECORD_SPLIT_RULE` compares for a record's split key: it decides the split, and the smallest
    one names the record held out when the rule picks none (`worker.scan_split`)."""
    text = "\x1e".join(f"{turn['role']}\x1f{turn['content']}" for turn in key).encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(f"{seed}\n".encode() + text).digest()
    return int.from_bytes(digest[:8], "big")


def hash_held_out(value: int, fraction: float) -> bool:
    """Whether `RECORD_SPLIT_RULE` holds out a record with split hash `value` (none at fraction 0)."""
    return fraction > 0 and value / 2**64 < fraction


def held_out(key: Messages, fraction: float, seed: int = 0, forced: int | None = None) -> bool:
    """Whether a record belongs to the validation split: a hash of its content (see `RECORD_SPLIT_RULE`), so the
    split does not depend on file order, the number of workers or processes, and duplicates land together.
    `forced`: the split hash `prepare` holds out when the rule picks no record (see `worker.scan_split`)."""
    if fraction <= 0:
        return False
    value = record_hash(key, seed)
    return hash_held_out(value, fraction) or value == forced


# --------------------------------------------------------------------------------------------- the template


class PieceRecorder:
    """A stand-in tokenizer for a template: `encode(text)` notes the piece and returns one placeholder id (-1 - k
    for piece k); BOS and EOS are the real tokenizer's. Templates insert special tokens as ids and encode text
    pieces with `encode(piece, bos=False, eos=False)`, so this sees every piece they encode."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        self.vocab_size, self.fingerprint = tokenizer.vocab_size, tokenizer.fingerprint
        self.pieces: list[str] = []

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        if bos or eos:
            raise ValueError("a chat template must insert BOS / EOS as ids, not ask the tokenizer for them")
        self.pieces.append(text)
        return [-len(self.pieces)]

    def decode(self, ids: list[int]) -> str:
        raise ValueError("a chat template should not decode while encoding")


def encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """`tokenizer.encode(text)` for each text, in one `encode_batch` call when the tokenizer has one."""
    batch = getattr(tokenizer, "encode_batch", None)
    return batch(texts) if batch is not None else [tokenizer.encode(text) for text in texts]


def encode_conversations(
    template: ChatTemplate, tokenizer: Tokenizer, conversations: Sequence[Messages], *, generation_prompt: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`template.encode(tokenizer, messages)` for each conversation, as (int32 ids, bool trained) arrays, with every
    text piece of the batch encoded in one tokenizer call and the pieces put back in place by one numpy gather (no
    per-token Python work)."""
    if not conversations:
        return []
    recorder = PieceRecorder(tokenizer)
    laid_out = [
        template.encode(recorder, messages, add_generation_prompt=generation_prompt)  # type: ignore[arg-type]
        for messages in conversations
    ]
    pieces = encode_batch(tokenizer, recorder.pieces) if recorder.pieces else []
    piece_lengths = [len(piece) for piece in pieces]
    piece_starts = list(itertools.accumulate(piece_lengths, initial=0))
    flat = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=piece_starts[-1])
    # Segments of the output: a piece (read from `flat`) or one special id (read from `specials`, after `flat`).
    sources: list[int] = []
    lengths: list[int] = []
    flags: list[bool] = []
    specials: list[int] = []
    totals: list[int] = []
    for ids, trained in laid_out:
        total = 0
        for token, is_trained in zip(ids, trained, strict=True):
            if token < 0:
                sources.append(piece_starts[-1 - token])
                lengths.append(piece_lengths[-1 - token])
            else:
                sources.append(len(flat) + len(specials))
                specials.append(token)
                lengths.append(1)
            flags.append(bool(is_trained))
            total += lengths[-1]
        totals.append(total)
    source = np.concatenate([flat, np.asarray(specials, dtype=np.int32)])
    length = np.asarray(lengths, dtype=np.int64)
    offsets = np.cumsum(length) - length
    gather = np.repeat(np.asarray(sources, dtype=np.int64) - offsets, length) + np.arange(int(length.sum()))
    all_ids, all_trained = source[gather], np.repeat(np.asarray(flags, dtype=bool), length)
    cuts = list(itertools.accumulate(totals))[:-1]
    return list(zip(np.split(all_ids, cuts), np.split(all_trained, cuts), strict=True))


_PROBE: Messages = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
    {"role": "assistant", "content": "A2"},
]


def template_fingerprint(template: ChatTemplate) -> str:
    """Identifies what a template does, not what it is called: sha256 of its name and of the layout (text pieces,
    special ids, trained flags) it gives a probe conversation, with and without the generation prompt. Prepared
    data records it; a run with a template that lays turns out differently is refused."""

    class Probe:
        bos_id, eos_id, pad_id, vocab_size, fingerprint = -2, -3, -4, 0, "probe"

        def __init__(self) -> None:
            self.pieces: list[str] = []

        def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
            self.pieces.append(text)
            return [-100 - len(self.pieces)]

    layouts = []
    for messages, generation in ((_PROBE, False), (_PROBE[:4], True)):
        probe = Probe()
        ids, trained = template.encode(probe, messages, add_generation_prompt=generation)  # type: ignore[arg-type]
        layouts.append({"ids": list(ids), "trained": [bool(t) for t in trained], "pieces": probe.pieces})
    text = json.dumps({"name": template.name, "layouts": layouts}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------- counting


@dataclass
class SplitCounts:
    """What one split of a prepared folder holds and what was left out, and why."""

    records: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, where: str, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.skipped_examples) < MAX_EXAMPLES:
            self.skipped_examples.append(f"{where}: {reason}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "truncated": self.truncated,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_examples": list(self.skipped_examples),
        }

    def add(self, other: dict[str, Any]) -> None:
        """Sum another split's counts (a worker's report) into these."""
        for key in ("records", "tokens", "trained_tokens", "truncated"):
            setattr(self, key, getattr(self, key) + other[key])
        self.skipped.update(other["skipped"])
        room = MAX_EXAMPLES - len(self.skipped_examples)
        self.skipped_examples.extend(other["skipped_examples"][: max(room, 0)])


def reasons(skipped: dict[str, int]) -> str:
    """'reason: count, ...' in reason order; empty when nothing was skipped."""
    return ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items()))


def skip_summary(skipped: dict[str, int]) -> str:
    """'skipped N (reason: count, ...)', or 'skipped 0'."""
    listed = reasons(skipped)
    return f"skipped {sum(skipped.values())}" + (f" ({listed})" if listed else "")


# ------------------------------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class Encoded:
    """One record's item as stored, with what the counts need: tokens, trained tokens, whether it was cut."""

    item: dict[str, Any]
    tokens: int
    trained_tokens: int = 0
    truncated: bool = False


class RecordFormat(ABC):
    """Records (JSON objects) -> litdata items, for one stage. Subclasses set the class attributes and implement
    `parse` (a record -> what the template encodes, or the reason it cannot be used) and `encode_parsed`.

    A format is picklable (prepare's workers run it) and holds everything its items depend on, which `settings`
    lists for the manifest and the cache key of raw files prepared on first use."""

    name: ClassVar[str]
    builtin_prefixes: ClassVar[tuple[str, ...]] = ()  # built-in corpora this format reads
    needs: ClassVar[Columns] = ()  # parquet columns a file must have (a tuple inside: one of these)
    optional: ClassVar[tuple[str, ...]] = ()  # parquet columns read too when a file has them
    all_columns: ClassVar[bool] = True
    not_text: ClassVar[str] = "{path} is a .txt file; records must be .jsonl, .json or .parquet"
    missing: ClassVar[str] = "{path} has no columns {needs} (columns: {columns})"
    version: ClassVar[int] = 1  # bump when the items change for the same records and settings

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate) -> None:
        self.tokenizer, self.template = tokenizer, template

    # -- what the items depend on --------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The format's own settings (max_length, ...), as the manifest records them."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {
            "format": self.name,
            "format_version": self.version,
            "template": {"name": self.template.name, "fingerprint": template_fingerprint(self.template)},
            **self.settings(),
        }

    # -- reading -------------------------------------------------------------------------------------------

    def read_builtin(self, spec: str) -> Iterator[ObjectRecord]:
        raise DataError(f"{spec} is not a built-in corpus of {self.name} records")

    def read(self, spec: str) -> Iterator[ObjectRecord]:
        """Every record of one input (a file, glob, folder, URL or built-in corpus), in a fixed order."""
        if spec.startswith(self.builtin_prefixes):
            yield from self.read_builtin(spec)
            return
        if spec.startswith(BUILTIN_PREFIXES):
            choices = " or ".join(prefix + "..." for prefix in self.builtin_prefixes) or "none"
            raise DataError(f"{spec} holds no {self.name} records; the built-in {self.name} corpora are {choices}")
        needs = ", ".join(repr(n) if isinstance(n, str) else " or ".join(map(repr, n)) for n in self.needs)
        missing = self.missing.replace("{needs}", needs)
        yield from read_objects(
            spec,
            self.needs,
            all_columns=self.all_columns,
            not_text=self.not_text,
            missing=missing,
            optional=self.optional,
        )

    def units(self, spec: str) -> list[str]:
        """The units of work one input splits into: a file each, a built-in corpus whole."""
        if spec.startswith(BUILTIN_PREFIXES):
            next(iter(self.read(spec)), None)  # a built-in this format does not read fails here, before any work
            return [spec]
        units = []
        for source in expand_input(spec):
            kind, _ = split_name(source.path)
            if kind == ".txt":
                raise DataError(self.not_text.format(path=source.path))
            units.append(source.path)
        return units

    # -- encoding ------------------------------------------------------------------------------------------

    @abstractmethod
    def parse(self, value: dict[str, Any]) -> Any:
        """What the record holds (for `split_key` and `encode_parsed`), or a str: the reason it cannot be used."""

    @abstractmethod
    def split_key(self, parsed: Any) -> Messages:
        """The turns the held-out split hashes."""

    @abstractmethod
    def encode_parsed(self, parsed: list[Any]) -> list[Encoded | str]:
        """Items (or skip reasons) for a batch of parsed records, in order."""
