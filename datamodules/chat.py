"""`ChatData`: conversations in Tülu 3 `messages` form, tokenized with a chat template, packed into training rows.

Records come from .jsonl / .parquet files (paths, globs, folders or fsspec URLs, compressed .jsonl too, as
`prepare --input` names them) holding a `messages` field, or from a built-in chat corpus (`builtin-chat:pydoc`,
`builtin-chat:arithmetic?count=2000`, see `moxin_lightning.data.builtin_chat`). Each record is
`{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`.

A conversation is encoded by the template (ids, and which ids are the assistant's), cut to `max_length` tokens,
and trained only on the assistant's tokens: `labels[t] = input_ids[t + 1]` where that next token is the
assistant's, -100 elsewhere. A record that cannot be used (bad shape, unknown role, no assistant turn, or no
assistant token left within `max_length`) is skipped and counted under its reason, never trained on silently.

With `pack`, whole conversations are packed greedily into rows of `max_length` tokens; `doc_ids` tell the model
where each conversation starts (attention never crosses one) and `positions` restart at 0, so a packed row gives
every conversation exactly the log-probs it would get alone. SFT is epoch-based: the rows are fixed at `setup`
and each epoch visits them in an order drawn from (seed, epoch); with several processes Lightning wraps that
order in a distributed sampler, so the processes split every epoch's rows between them.

Everything is read and tokenized in `setup`, in memory (flat int32 arrays), on every process.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import Dataset

from datamodules.checks import check_arguments, model_limits
from datamodules.loaders import SplitLoaders
from datamodules.skips import count_skip, nothing_usable, skip_summary
from moxin_lightning.data.builtin_chat import NAMES as BUILTIN_NAMES
from moxin_lightning.data.builtin_chat import PREFIX as BUILTIN_CHAT
from moxin_lightning.data.builtin_chat import records_of
from moxin_lightning.data.sources import INVALID_UTF8, NOT_AN_OBJECT, DataError, read_objects
from moxin_lightning.tokenizers import Tokenizer
from moxin_lightning.tokenizers.chat import ASSISTANT, ROLES, TULU, ChatTemplate

IGNORE_INDEX = -100
MESSAGES = "messages"
# Why a record was not trained on; `ChatData.skipped` counts skips under exactly these strings.
MISSING_MESSAGES = "missing messages"
BAD_MESSAGES = "messages not a non-empty list of {role, content: str}"
UNKNOWN_ROLE = "unknown role"
NO_ASSISTANT = "no assistant turn"
TRUNCATED = "no assistant token within max_length"
_NOT_TEXT = "{path} is a .txt file; chat records need .jsonl or .parquet with a 'messages' field"
_NO_MESSAGES = "{path} has no column 'messages' (columns: {columns}); chat records need one"


# ------------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ChatRecord:
    """One record: its messages, or the reason it cannot be used (`skip`). `where` locates it."""

    where: str
    messages: list[dict[str, Any]] | None = None
    skip: str | None = None


def messages_problem(messages: Any) -> str | None:
    """Why `messages` is not a usable conversation, or None."""
    if messages is None:
        return MISSING_MESSAGES
    if not isinstance(messages, list) or not messages:
        return BAD_MESSAGES
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return BAD_MESSAGES
        if message.get("role") not in ROLES:
            return UNKNOWN_ROLE
        try:
            message["content"].encode("utf-8")
        except UnicodeEncodeError:
            return INVALID_UTF8
    if not any(message["role"] == ASSISTANT for message in messages):
        return NO_ASSISTANT
    return None


def checked_record(where: str, value: Any) -> ChatRecord:
    if not isinstance(value, dict):
        return ChatRecord(where, skip=NOT_AN_OBJECT)
    problem = messages_problem(value.get(MESSAGES))
    return ChatRecord(where, skip=problem) if problem else ChatRecord(where, messages=value[MESSAGES])


def read_chat_records(spec: str) -> Iterator[ChatRecord]:
    """Every record one `train` / `val` entry names, in a fixed order (glob matches sorted)."""
    if spec.startswith(BUILTIN_CHAT):
        for index, record in enumerate(records_of(spec)):
            yield checked_record(f"{spec}#{index}", record)
        return
    if spec.startswith("builtin:"):
        choices = " or ".join(BUILTIN_CHAT + name for name in BUILTIN_NAMES)
        raise DataError(f"{spec} is plain text for pretraining; the built-in chat corpora are {choices}")
    for found in read_objects(spec, (MESSAGES,), all_columns=False, not_text=_NOT_TEXT, missing=_NO_MESSAGES):
        if found.value is None:
            yield ChatRecord(found.where, skip=found.skip)
        else:
            yield checked_record(found.where, found.value)


def held_out(messages: list[dict[str, Any]], fraction: float) -> bool:
    """Whether a conversation belongs to the validation split: a hash of its content, so the split does not
    depend on file order, seed or the number of processes."""
    if fraction <= 0:
        return False
    text = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") / 2**64 < fraction


# ------------------------------------------------------------------------------------------------------ encoding


@dataclass
class SplitStats:
    """What reading and encoding one split found."""

    conversations: int = 0
    truncated: int = 0  # kept, cut to max_length
    tokens: int = 0
    trained_tokens: int = 0  # labels that are not -100
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, where: str, reason: str) -> None:
        count_skip(self.skipped, self.skipped_examples, where, reason)

    def summary(self) -> str:
        return (
            f"{self.conversations} conversations ({self.truncated} truncated), {self.tokens} tokens "
            f"({self.trained_tokens} trained) in {self.rows} rows; {skip_summary(self.skipped)}"
        )


class EncodedChats:
    """Encoded conversations back to back: `tokens` (int32), `trained` (bool) and `offsets` (conversation i is
    tokens[offsets[i]:offsets[i + 1]]). Flat arrays keep a million conversations in a few bytes per token."""

    def __init__(self) -> None:
        self._tokens: list[np.ndarray] = []
        self._trained: list[np.ndarray] = []
        self.tokens = np.zeros(0, dtype=np.int32)
        self.trained = np.zeros(0, dtype=bool)
        self.offsets = np.zeros(1, dtype=np.int64)

    def add(self, ids: list[int], trained: list[bool]) -> None:
        self._tokens.append(np.asarray(ids, dtype=np.int32))
        self._trained.append(np.asarray(trained, dtype=bool))

    def finish(self) -> EncodedChats:
        if self._tokens:
            self.tokens = np.concatenate(self._tokens)
            self.trained = np.concatenate(self._trained)
            self.offsets = np.concatenate([[0], np.cumsum([len(t) for t in self._tokens])]).astype(np.int64)
        self._tokens, self._trained = [], []
        return self

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def conversation(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.tokens[start:end], self.trained[start:end]


def trainable_tokens(trained: list[bool]) -> int:
    """Labels a conversation yields: tokens that are the assistant's and have a token before them."""
    return sum(trained[1:])


class SplitEncoder:
    """Encodes one split's records: template, truncation to `max_length`, counting. A record with no trainable
    token left is skipped under `TRUNCATED`."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate, max_length: int) -> None:
        self.tokenizer, self.template, self.max_length = tokenizer, template, max_length
        self.chats, self.stats = EncodedChats(), SplitStats()

    def add(self, record: ChatRecord) -> None:
        if record.skip is not None or record.messages is None:
            self.stats.skip(record.where, record.skip or MISSING_MESSAGES)
            return
        ids, trained = self.template.encode(self.tokenizer, record.messages)
        truncated = len(ids) > self.max_length
        ids, trained = ids[: self.max_length], trained[: self.max_length]
        count = trainable_tokens(trained)
        if count == 0:
            self.stats.skip(record.where, TRUNCATED)
            return
        self.chats.add(ids, trained)
        self.stats.truncated += truncated
        self.stats.conversations += 1
        self.stats.tokens += len(ids)
        self.stats.trained_tokens += count


def pack_rows(lengths: np.ndarray, max_length: int, order: np.ndarray | None = None) -> list[np.ndarray]:
    """Greedy packing: conversations in `order` fill a row until the next one would not fit, which opens a new
    row. Every conversation is at most `max_length` long, so each lands in exactly one row, whole."""
    rows: list[list[int]] = []
    used = max_length + 1  # forces a first row
    for index in range(len(lengths)) if order is None else order:
        if used + lengths[index] > max_length:
            rows.append([])
            used = 0
        rows[-1].append(int(index))
        used += int(lengths[index])
    return [np.asarray(row, dtype=np.int64) for row in rows]


# ------------------------------------------------------------------------------------------------------- batches


class ChatRows(Dataset):
    """Map-style dataset: row i is the conversations `rows[i]` back to back, as numpy arrays (unpadded)."""

    def __init__(self, chats: EncodedChats, rows: list[np.ndarray]) -> None:
        self.chats, self.rows = chats, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        ids, labels, doc_ids, positions = [], [], [], []
        for doc, conversation in enumerate(self.rows[index]):
            tokens, trained = self.chats.conversation(int(conversation))
            tokens = tokens.astype(np.int64)
            target = np.full(len(tokens), IGNORE_INDEX, dtype=np.int64)
            target[:-1] = np.where(trained[1:], tokens[1:], IGNORE_INDEX)  # the last token predicts nothing here
            ids.append(tokens)
            labels.append(target)
            doc_ids.append(np.full(len(tokens), doc, dtype=np.int64))
            positions.append(np.arange(len(tokens), dtype=np.int64))
        return {
            "input_ids": np.concatenate(ids),
            "labels": np.concatenate(labels),
            "doc_ids": np.concatenate(doc_ids),
            "positions": np.concatenate(positions),
        }


class ChatCollator:
    """Rows -> a batch of (B, T) long tensors, right-padded to `length` (None: the longest row).

    Padding uses `pad_id`, labels -100, a `doc_ids` value of its own (it attends only to padding) and positions
    counting from 0."""

    def __init__(self, pad_id: int, length: int | None = None) -> None:
        self.pad_id, self.length = pad_id, length

    def __call__(self, rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        width = self.length or max(len(row["input_ids"]) for row in rows)
        batch = {
            "input_ids": torch.full((len(rows), width), self.pad_id, dtype=torch.long),
            "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
            "doc_ids": torch.zeros((len(rows), width), dtype=torch.long),
            "positions": torch.zeros((len(rows), width), dtype=torch.long),
        }
        for index, row in enumerate(rows):
            size = len(row["input_ids"])
            for key, values in row.items():
                batch[key][index, :size] = torch.from_numpy(values)
            batch["doc_ids"][index, size:] = int(row["doc_ids"][-1]) + 1
            batch["positions"][index, size:] = torch.arange(width - size)
        if not (batch["labels"] != IGNORE_INDEX).any():
            raise ValueError("a chat batch has no assistant token to train on; every row should have at least one")
        return batch


# --------------------------------------------------------------------------------------------------- datamodule


class ChatData(SplitLoaders, L.LightningDataModule):
    """Batches {input_ids, labels, doc_ids, positions} of shape (batch_size, T) for supervised fine-tuning.

    Args:
        train: .jsonl / .parquet files, globs, folders or URLs with a `messages` field, or `builtin-chat:...`.
        val: the same for validation; None: hold out `val_fraction` of `train` (by a hash of each conversation).
        val_fraction: share of `train` held out when `val` is None (0: no validation).
        tokenizer: the model's tokenizer (required).
        template: lays a conversation out as tokens (default: Tülu's).
        max_length: tokens per conversation (longer ones are cut) and per packed row.
        pack: pack several conversations per row (rows of exactly `max_length`); else one per row, padded to the
            longest in its batch.
        batch_size: rows per batch (per process).
        shuffle: visit the rows in a new order each epoch (drawn from seed + epoch), and pack in a seeded order.
        seed: shuffling seed.
        num_workers: DataLoader worker processes.
        max_seq_len, vocab_size: limits to check against; taken from the task's `model_config` when attached.
    """

    def __init__(
        self,
        train: list[str],
        val: list[str] | None = None,
        val_fraction: float = 0.0,
        tokenizer: Tokenizer | None = None,
        template: ChatTemplate = TULU,
        max_length: int = 4096,
        pack: bool = True,
        batch_size: int = 8,
        shuffle: bool = True,
        seed: int = 42,
        num_workers: int = 0,
        max_seq_len: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        check_arguments(
            "ChatData",
            train,
            val,
            val_fraction,
            tokenizer,
            max_length,
            batch_size,
            inputs="file, glob or builtin-chat: corpus",
            two_tokens="a token and the one it predicts",
        )
        assert tokenizer is not None  # checked above; tells the type checker
        self.train_files, self.val_files, self.val_fraction = [str(t) for t in train], val, val_fraction
        self.tokenizer = tokenizer
        self.template = template
        self.max_length, self.pack = max_length, pack
        self.batch_size, self.shuffle, self.seed, self.num_workers = batch_size, shuffle, seed, num_workers
        self.max_seq_len, self.vocab_size = max_seq_len, vocab_size
        pad = tokenizer.pad_id
        self.pad_id = pad if pad >= 0 else tokenizer.eos_id
        self.datasets: dict[str, ChatRows] = {}
        self.stats: dict[str, SplitStats] = {}

    @property
    def skipped(self) -> dict[str, dict[str, int]]:
        """Skipped records per split ('train', 'val') and reason."""
        return {split: dict(stats.skipped) for split, stats in self.stats.items()}

    # -- setup --------------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        self.max_seq_len, self.vocab_size = model_limits(
            self.trainer, self.max_length, self.tokenizer, self.max_seq_len, self.vocab_size
        )
        if self.datasets:
            return
        encoders = {"train": SplitEncoder(self.tokenizer, self.template, self.max_length)}
        if self.val_files is not None or self.val_fraction > 0:
            encoders["val"] = SplitEncoder(self.tokenizer, self.template, self.max_length)
        for record in self._records(self.train_files):
            is_val = record.messages is not None and held_out(record.messages, self.val_fraction)
            encoders["val" if is_val else "train"].add(record)
        for record in self._records(self.val_files or []):
            encoders["val"].add(record)
        for split, encoder in encoders.items():
            chats, stats = encoder.chats.finish(), encoder.stats
            if len(chats) == 0:
                raise ValueError(self._nothing_trainable(split, stats))
            order = None
            if self.pack and self.shuffle and split == "train":
                order = np.random.default_rng(self.seed).permutation(len(chats))
            if self.pack:
                rows = pack_rows(chats.lengths, self.max_length, order)
            else:
                rows = [np.asarray([index]) for index in range(len(chats))]
            stats.rows = len(rows)
            self.datasets[split], self.stats[split] = ChatRows(chats, rows), stats
        rank_zero_info(self.summary())

    @staticmethod
    def _records(specs: list[str]) -> Iterator[ChatRecord]:
        for spec in specs:
            yield from read_chat_records(spec)

    def _nothing_trainable(self, split: str, stats: SplitStats) -> str:
        return nothing_usable(
            usable="trainable conversation",
            check="the files' messages",
            split=split,
            train=self.train_files,
            val=self.val_files,
            val_fraction=self.val_fraction,
            max_length=self.max_length,
            skipped=stats.skipped,
        )

    def summary(self) -> str:
        """One line: what each split holds and what was skipped, and why."""
        splits = "; ".join(f"{split}: {stats.summary()}" for split, stats in self.stats.items())
        layout = f"packed into rows of {self.max_length}" if self.pack else f"one per row, max_length {self.max_length}"
        return f"ChatData ({self.template.name} template, {layout}) {splits}"

    # -- loaders ------------------------------------------------------------------------------------------

    def collate(self) -> ChatCollator:
        return ChatCollator(self.pad_id, self.max_length if self.pack else None)
