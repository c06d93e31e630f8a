"""`PreferenceData`: DPO pairs (a prompt, a chosen and a rejected response), streamed from a prepared folder.

`train` names a folder `prepare --format preference` wrote, or raw pair records (.jsonl / .json / .parquet
files, globs, folders, URLs, or `builtin-pairs:arithmetic?count=N`) that are prepared on first use through the
same code (see `RecordData`). The record conventions, the prompt extraction and the truncation rules to
`max_length` are `moxin_lightning.data.preference_records`'.

Each pair becomes two sequences, prompt + chosen and prompt + rejected, with the same prompt tokens; labels are
next-token targets on response tokens only (-100 elsewhere). `pair_index` is the pair's position in its split,
the same whatever the shuffling or the number of processes, which the DPO reference cache keys on.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from moxin_lightning.data.preference_records import PreferenceFormat
from moxin_lightning.data.prepare_records import DEFAULT_MAX_LENGTH
from moxin_lightning.datamodules.chat import next_token_labels
from moxin_lightning.datamodules.records import RecordData
from moxin_lightning.losses import IGNORE_INDEX
from moxin_lightning.tokenizers import Tokenizer
from moxin_lightning.tokenizers.chat import TULU, ChatTemplate

SEQUENCE_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def pair_sequences(item: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ids and next-token labels of an item's chosen and rejected sequences (prompt + response each)."""
    prompt = np.asarray(item["prompt"], dtype=np.int64)
    pair = {}
    for side in ("chosen", "rejected"):
        ids = np.concatenate([prompt, np.asarray(item[side], dtype=np.int64)])
        trained = np.concatenate([np.zeros(len(prompt), dtype=np.uint8), item[f"{side}_trained"]])
        pair[f"{side}_input_ids"], pair[f"{side}_labels"] = ids, next_token_labels(ids, trained)
    return pair


class PadPairs:
    """Collate: chosen and rejected right-padded to one length, the batch's longest or `length` when set."""

    def __init__(self, pad_id: int, length: int | None = None) -> None:
        self.pad_id, self.length = pad_id, length

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = [pair_sequences(item) for item in items]
        length = self.length or max(len(pair[key]) for pair in pairs for key in SEQUENCE_KEYS)
        batch = {}
        for key in SEQUENCE_KEYS:
            filler = IGNORE_INDEX if key.endswith("labels") else self.pad_id
            rows = torch.full((len(items), length), filler, dtype=torch.long)
            for row, pair in zip(rows, pairs, strict=True):
                row[: len(pair[key])] = torch.from_numpy(pair[key])
            batch[key] = rows
        batch["pair_index"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
        return batch


class PreferenceData(RecordData):
    """Batches {chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels: (B, T), pair_index: (B,)}.

    Args:
        max_length: tokens per sequence (Moxin's DPO: 2048); must equal the prepared folder's (None: take it from
            the folder; raw records: 2048).
        truncation: how a pair beyond `max_length` is cut: `prompt_first` (the prompt from the left, then the
            responses) or `right` (each whole sequence from the right, as Moxin's DPO did); must equal the prepared
            folder's (None: take it from the folder; raw records: prompt_first).
        pad_to_max_length: pad every batch to `max_length` (fixed shapes) instead of its longest sequence.
        Others: see `RecordData`.
    """

    format_name = "preference"
    usable = "usable preference pair"

    def __init__(
        self,
        train: list[str],
        val: list[str] | None = None,
        val_fraction: float = 0.0,
        tokenizer: Tokenizer | None = None,
        template: ChatTemplate = TULU,
        max_length: int | None = None,
        truncation: Literal["prompt_first", "right"] | None = None,
        batch_size: int = 8,
        shuffle: bool = True,
        seed: int = 42,
        num_workers: int = 0,
        pad_to_max_length: bool = False,
        max_seq_len: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length={max_length} must be at least 2 (a prompt token and a response token)")
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
        self._max_length, self._truncation, self.pad_to_max_length = max_length, truncation, pad_to_max_length

    @property
    def max_length(self) -> int:
        return self._max_length or self._prepared_setting("max_length") or DEFAULT_MAX_LENGTH["preference"]

    @property
    def truncation(self) -> str:
        return self._truncation or self._prepared_setting("truncation") or "prompt_first"

    def record_format(self, tokenizer: Tokenizer) -> PreferenceFormat:
        return PreferenceFormat(tokenizer, self.template, self.max_length, self.truncation)

    def _check_settings(self, folder: str, records: dict[str, Any]) -> None:
        self._check_setting(folder, records, "max_length", self.max_length, "max_length")
        self._check_setting(folder, records, "truncation", self.truncation, "truncation")

    def sequence_length(self) -> int:
        return self.max_length

    def collate(self) -> PadPairs:
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id >= 0 else self.tokenizer.eos_id
        return PadPairs(pad, self.max_length if self.pad_to_max_length else None)

    def pair_count(self, split: str = "train") -> int:
        return self.count(split)
