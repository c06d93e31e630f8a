"""`PromptData`: prompts with reference answers, for reinforcement learning on outcomes (GRPO).

`train` names a folder `prepare --format prompts` wrote, or raw prompt records (.jsonl / .json / .parquet files,
globs, folders, URLs, or `builtin-prompts:arithmetic?count=N` / `builtin-prompts:gsm_symbolic?...`) that are
prepared on first use through the same code (see `RecordData`). Which fields hold the prompt and the answer, the
instruction appended to file records, and the skipping of prompts longer than `max_prompt_length` are
`moxin_lightning.data.prompt_records`'.

Batches keep lists: the generator takes unpadded prompts, and the rewards read text. Each process gets
`batch_size` prompts per step (each is sampled `group_size` times by the task).
"""

from __future__ import annotations

from typing import Any

import torch

from moxin_lightning.data.prepare_records import DEFAULT_MAX_LENGTH
from moxin_lightning.data.prompt_records import PromptFormat
from moxin_lightning.datamodules.records import RecordData
from moxin_lightning.tokenizers import Tokenizer
from moxin_lightning.tokenizers.chat import TULU, ChatTemplate


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Lists stay lists (prompts unpadded, for the generator; text for the rewards); only `prompt_index` is a
    (B,) long tensor."""
    return {
        "prompt_ids": [[int(token) for token in item["ids"]] for item in items],
        "prompt_text": [item["text"] for item in items],
        "answer": [item["answer"] for item in items],
        "prompt_index": torch.tensor([item["index"] for item in items], dtype=torch.long),
    }


class PromptData(RecordData):
    """Batches {prompt_ids: list[list[int]], prompt_text: list[str], answer: list[str], prompt_index: (B,)}.

    Args:
        max_prompt_length: longest prompt in tokens (Moxin-Reasoning: 1024); longer ones are skipped when
            prepared, not cut (a cut question is another question). Must equal the prepared folder's (None: take
            it from the folder; raw records: 1024).
        instruction: text appended to the last prompt turn of every file record (not to built-in prompts, which
            carry their own); must equal the prepared folder's.
        Others: see `RecordData`.
    """

    format_name = "prompts"
    usable = "usable prompt"

    def __init__(
        self,
        train: list[str],
        val: list[str] | None = None,
        val_fraction: float = 0.0,
        tokenizer: Tokenizer | None = None,
        template: ChatTemplate = TULU,
        max_prompt_length: int | None = None,
        batch_size: int = 8,
        shuffle: bool = True,
        seed: int = 42,
        instruction: str | None = None,
        num_workers: int = 0,
        max_seq_len: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        if max_prompt_length is not None and max_prompt_length < 2:
            raise ValueError(f"max_prompt_length={max_prompt_length} must be at least 2 (BOS and a prompt token)")
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
        self._max_prompt_length, self._instruction = max_prompt_length, instruction or None

    @property
    def max_prompt_length(self) -> int:
        prepared = self._prepared_setting("max_prompt_length")
        return self._max_prompt_length or prepared or DEFAULT_MAX_LENGTH["prompts"]

    @property
    def instruction(self) -> str | None:
        return self._instruction if self._instruction is not None else self._prepared_setting("instruction")

    def record_format(self, tokenizer: Tokenizer) -> PromptFormat:
        return PromptFormat(tokenizer, self.template, self.max_prompt_length, self.instruction)

    def _check_settings(self, folder: str, records: dict[str, Any]) -> None:
        self._check_setting(folder, records, "max_prompt_length", self.max_prompt_length, "max_prompt_length")
        self._check_setting(folder, records, "instruction", self.instruction, "instruction")

    def _model_limits(self, config: Any) -> None:
        super()._model_limits(config)
        if self.max_seq_len is not None and self.max_prompt_length >= self.max_seq_len:
            raise ValueError(
                f"max_prompt_length={self.max_prompt_length} leaves no room for a response in the model's "
                f"max_seq_len={self.max_seq_len}; lower max_prompt_length"
            )

    def collate(self) -> Any:
        return collate_prompts
