"""Pack a stream of whole documents into training rows of `seq_len` tokens.

Consecutive rows overlap by exactly one token: the token that is the last label of row i is the first
input of row i + 1. Read as inputs, the rows are therefore the document stream itself, with no token
skipped or repeated, whatever `seq_len` is and however often it changes (context extension switches it
mid-run). Each row carries document ids, so attention never crosses a document boundary, and the label
that would predict the first token of the next document is masked.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100


class TokenPacker:
    """Holds the tokens read but not yet emitted, and cuts them into rows on demand."""

    def __init__(self) -> None:
        self._tokens = np.zeros(0, dtype=np.int64)
        self._starts = np.zeros(0, dtype=bool)  # True where a document begins
        self.tokens_emitted = 0  # input tokens handed out so far

    @property
    def buffered(self) -> int:
        return len(self._tokens)

    def add_documents(self, documents: Iterable[Any]) -> None:
        """Append whole documents (1-D token arrays, each beginning a new document)."""
        arrays = [np.asarray(doc, dtype=np.int64).reshape(-1) for doc in documents]
        arrays = [a for a in arrays if len(a)]
        if not arrays:
            return
        starts = [np.zeros(len(a), dtype=bool) for a in arrays]
        for flags in starts:
            flags[0] = True
        self._tokens = np.concatenate([self._tokens, *arrays])
        self._starts = np.concatenate([self._starts, *starts])

    def can_emit(self, rows: int, seq_len: int) -> bool:
        return self.buffered >= rows * seq_len + 1

    def emit(self, rows: int, seq_len: int) -> dict[str, torch.Tensor]:
        """`rows` rows of `seq_len` inputs: input_ids, labels (next token, masked across documents), doc_ids."""
        if not self.can_emit(rows, seq_len):
            raise RuntimeError(f"packer holds {self.buffered} tokens, {rows * seq_len + 1} needed")
        span = rows * seq_len
        tokens, starts = self._tokens[: span + 1], self._starts[: span + 1]
        inputs = tokens[:span].reshape(rows, seq_len)
        labels = tokens[1 : span + 1].reshape(rows, seq_len).copy()
        # A label that opens a new document is not predictable from the previous one.
        labels[starts[1 : span + 1].reshape(rows, seq_len)] = IGNORE_INDEX
        row_starts = starts[:span].reshape(rows, seq_len).copy()
        row_starts[:, 0] = True  # a row's first token opens its first segment
        doc_ids = np.cumsum(row_starts, axis=1) - 1
        self._tokens, self._starts = self._tokens[span:], self._starts[span:]
        self.tokens_emitted += span
        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(inputs)),
            "labels": torch.from_numpy(labels),
            "doc_ids": torch.from_numpy(doc_ids),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "tokens": torch.from_numpy(self._tokens.copy()),
            "starts": torch.from_numpy(self._starts.copy()),
            "tokens_emitted": self.tokens_emitted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._tokens = np.asarray(state["tokens"], dtype=np.int64)
        self._starts = np.asarray(state["starts"], dtype=bool)
        self.tokens_emitted = int(state["tokens_emitted"])
