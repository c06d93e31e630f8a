"""`ChatData`: conversations (Tülu 3 `messages`) for supervised fine-tuning, streamed from a prepared folder.

`train` names a folder `prepare --format chat` wrote, or raw records (.jsonl / .json / .parquet files, globs,
folders, URLs, or a built-in chat corpus such as `builtin-chat:pydoc`) that are prepared on first use through the
same code (see `RecordData`). A record's item holds its template-encoded ids, cut to `max_length`, and which of
them are the assistant's (`moxin_lightning.data.chat_records`); it is trained on the assistant's tokens only:
`labels[t] = input_ids[t + 1]` where that next token is the assistant's, -100 elsewhere.

A batch is `batch_size` conversations. With `pack`, they are laid into as few rows of `max_length` tokens as they
fit in, in order (greedy: a conversation that does not fit opens a new row); `doc_ids` tell the model where each
conversation starts (attention never crosses one) and `positions` restart at 0, so a packed row gives every
conversation exactly the log-probs it would get alone, and a step trains on the same conversations with or
without packing, only in fewer padded tokens. Without `pack`, each conversation is a row, padded to the longest.

`reasoning_markers="think"` trains on OpenThoughts' replies rewritten into the `<think> ... </think>` form (and
without the system prompt that asks for its own markers), the form DeepScaleR's reward, which the GRPO after a
reasoning SFT scores with, reads (`moxin_lightning.data.chat_records`).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from moxin_lightning.data.chat_records import REASONING_MARKERS, ChatFormat
from moxin_lightning.data.prepare_records import DEFAULT_MAX_LENGTH
from moxin_lightning.datamodules.records import RecordData
from moxin_lightning.losses import IGNORE_INDEX
from moxin_lightning.tokenizers import Tokenizer
from moxin_lightning.tokenizers.chat import TULU, ChatTemplate


def next_token_labels(ids: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """labels[t] = ids[t + 1] where token t + 1 is trained, else -100 (and -100 at the last position)."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(trained[1:].astype(bool), ids[1:], IGNORE_INDEX)
    return labels


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Greedy packing in order: conversations fill a row until the next one would not fit, which opens a new
    row. Every conversation is at most `max_length` long, so each lands in exactly one row, whole."""
    rows: list[list[int]] = []
    used = max_length + 1  # forces a first row
    for index, length in enumerate(lengths):
        if used + length > max_length:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += length
    return rows


class ChatCollator:
    """Conversation items -> a batch {input_ids, labels, doc_ids, positions} of (rows, T) long tensors.

    With `pack`, rows of exactly `max_length` holding several conversations each; else one conversation per row,
    right-padded to the longest. Padding uses `pad_id`, labels -100, a `doc_ids` value of its own (it attends only
    to padding) and positions counting from 0."""

    def __init__(self, pad_id: int, max_length: int, pack: bool) -> None:
        self.pad_id, self.max_length, self.pack = pad_id, max_length, pack

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(item["ids"]) for item in items]
        groups = pack_rows(lengths, self.max_length) if self.pack else [[i] for i in range(len(items))]
        width = self.max_length if self.pack else max(lengths)
        batch = {
            "input_ids": torch.full((len(groups), width), self.pad_id, dtype=torch.long),
            "labels": torch.full((len(groups), width), IGNORE_INDEX, dtype=torch.long),
            "doc_ids": torch.zeros((len(groups), width), dtype=torch.long),
            "positions": torch.zeros((len(groups), width), dtype=torch.long),
        }
        for row, group in enumerate(groups):
            start = 0
            for doc, index in enumerate(group):
                ids = np.asarray(items[index]["ids"], dtype=np.int64)
                end = start + len(ids)
                batch["input_ids"][row, start:end] = torch.from_numpy(ids)
                batch["labels"][row, start:end] = torch.from_numpy(next_token_labels(ids, items[index]["trained"]))
                batch["doc_ids"][row, start:end] = doc
                batch["positions"][row, start:end] = torch.arange(len(ids))
                start = end
            batch["doc_ids"][row, start:] = len(group)
            batch["positions"][row, start:] = torch.arange(width - start)
        if not (batch["labels"] != IGNORE_INDEX).any():
            raise ValueError("a chat batch has no assistant token to train on; every conversation should have one")
        return batch


class ChatData(RecordData):
    """Batches {input_ids, labels, doc_ids, positions} of `batch_size` conversations for supervised fine-tuning.

    Args:
        max_length: tokens per conversation (longer ones are cut when prepared) and per packed row; must equal the
            prepared folder's (None: take it from the folder; raw records: 4096).
        reasoning_markers: `keep` (replies as written) or `think` (OpenThoughts' `<|begin_of_thought|>` ...
            `<|end_of_solution|>` sections rewritten into `<think> ... </think>` then the solution, and the system
            turn asking for those markers dropped, because the GRPO reward that follows gives 0 to a completion that
            does not close `</think>`; see `moxin_lightning.data.chat_records`); must equal the prepared folder's
            (None: take it from the folder, where a folder prepared before the setting existed counts as keep;
            raw records: keep).
        pack: pack the batch's conversations into rows of `max_length` (see the module docstring).
        Others: see `RecordData`.
    """

    format_name = "chat"
    usable = "trainable conversation"

    def __init__(
        self,
        train: list[str],
        val: list[str] | None = None,
        val_fraction: float = 0.0,
        tokenizer: Tokenizer | None = None,
        template: ChatTemplate = TULU,
        max_length: int | None = None,
        reasoning_markers: Literal["keep", "think"] | None = None,
        pack: bool = True,
        batch_size: int = 8,
        shuffle: bool = True,
        seed: int = 42,
        num_workers: int = 0,
        max_seq_len: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length={max_length} must be at least 2 (a token and the one it predicts)")
        if reasoning_markers is not None and reasoning_markers not in REASONING_MARKERS:
            raise ValueError(f"reasoning_markers={reasoning_markers!r} is not one of {', '.join(REASONING_MARKERS)}")
        super().__init__(
            train,
            val,
            val_fraction,
            tokenizer,
            template,
            batch_size,
            shuffle,
            seed,
            num_workers,
            max_seq_len,
            vocab_size,
        )
        self.pack, self._max_length, self._reasoning_markers = pack, max_length, reasoning_markers

    @property
    def max_length(self) -> int:
        return self._max_length or self._prepared_setting("max_length") or DEFAULT_MAX_LENGTH["chat"]

    @property
    def reasoning_markers(self) -> str:
        return self._reasoning_markers or self._prepared_setting("reasoning_markers") or "keep"

    def record_format(self, tokenizer: Tokenizer) -> ChatFormat:
        return ChatFormat(tokenizer, self.template, self.max_length, self.reasoning_markers)

    def _check_settings(self, folder: str, records: dict[str, Any]) -> None:
        self._check_setting(folder, records, "max_length", self.max_length, "max_length")
        # a folder prepared before the setting existed took its replies as written: keep
        records = {"reasoning_markers": "keep", **records}
        self._check_setting(folder, records, "reasoning_markers", self.reasoning_markers, "reasoning_markers")

    def sequence_length(self) -> int:
        return self.max_length

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id if self.tokenizer.pad_id >= 0 else self.tokenizer.eos_id

    def collate(self) -> ChatCollator:
        return ChatCollator(self.pad_id, self.max_length, self.pack)
