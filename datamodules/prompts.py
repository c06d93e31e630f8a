"""`PromptData`: prompts with reference answers, for reinforcement learning on outcomes (GRPO).

Records come from `.jsonl` (optionally compressed) or `.parquet` files, local or fsspec URLs, listed as for
`prepare --input` (paths, globs, folders), or from `builtin-prompts:arithmetic?count=N` (optional `seed=S`):
generated GSM-style word problems, nothing downloaded (`moxin_lightning.data.builtin_chat.prompt_records`).

A record holds a prompt and a reference answer, under the names the common sets use:
  * the prompt: `prompt` (a string, one user turn, or a list of `{"role", "content"}` messages, as TRL and veRL
    store it), else `messages` (a list), else `question` (GSM8K) or `problem` (MATH, DeepScaleR), both strings;
  * the answer: `answer` (a string or number; GSM8K's worked answer ending in `#### N` gives N), else `solution`
    (MATH's), whose last `\\boxed{...}` gives the answer.
`instruction` (e.g. DeepScaleR's "Let's think step by step ...") is appended to the last turn of every file
record's prompt, after a space, as DeepScaleR does.

A prompt is encoded by the chat template with its generation prompt (it ends with the header that asks for the
assistant's turn), so the policy continues it exactly as it would at inference. A record that cannot be used
(no prompt, a malformed one, one that ends with an assistant reply, no answer, or a prompt longer than
`max_prompt_length` tokens) is skipped and counted under its reason; a split left with none is a one-line error.

Batches keep lists: the generator takes unpadded prompts, and the rewards read text. GRPO is epoch-based: every
epoch visits the prompts in an order drawn from (seed, epoch); with several processes Lightning wraps that order
in its distributed sampler, so each process gets its share of every epoch's prompts (`batch_size` per step each).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import Dataset

from datamodules.chat import held_out
from datamodules.checks import check_arguments, model_limits
from datamodules.loaders import SplitLoaders
from datamodules.skips import count_skip, nothing_usable, skip_summary
from moxin_lightning.data.builtin_chat import PREFIX as BUILTIN_CHAT
from moxin_lightning.data.builtin_chat import PROMPTS_PREFIX, prompt_records_of
from moxin_lightning.data.sources import INVALID_UTF8, DataError, ObjectRecord, read_objects
from moxin_lightning.tokenizers import Tokenizer
from moxin_lightning.tokenizers.chat import ASSISTANT, ROLES, TULU, USER, ChatTemplate

# Why a record gave no prompt; `PromptData.skipped` counts under exactly these strings.
NO_PROMPT = "missing prompt"
BAD_PROMPT = "prompt not a string or a non-empty list of {role, content: str}"
UNKNOWN_ROLE = "unknown role"
ENDS_WITH_REPLY = "prompt ends with an assistant turn"
NO_ANSWER = "missing answer"
NO_BOXED = "solution without a \\boxed{} answer"
TOO_LONG = "prompt longer than max_prompt_length"
PROMPT_FIELDS = ("prompt", "messages", "question", "problem")
_NOT_TEXT = "{path} is a .txt file; prompt records must be .jsonl or .parquet"
_BOXED = re.compile(r"\\boxed\s*\{")

Messages = list[dict[str, str]]


# -- records -> prompts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One usable record: the prompt turns and the reference answer."""

    messages: Messages
    answer: str

    @property
    def text(self) -> str:
        """The last user turn's content: the question as written (what a reward or a log wants to show)."""
        users = [turn["content"] for turn in self.messages if turn["role"] == USER]
        return users[-1] if users else self.messages[-1]["content"]


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text`, braces matched (answers such as `\\frac{1}{2}` nest them),
    or None when there is none or it is never closed."""
    starts = [match.end() for match in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for position in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[start:position].strip()
    return None


def reference_answer(record: dict[str, Any]) -> str:
    """The record's reference answer, or the reason (NO_ANSWER, NO_BOXED) it has none."""
    answer = record.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if isinstance(answer, str) and answer.strip():
        return answer.rpartition("####")[2].strip() if "####" in answer else answer.strip()
    solution = record.get("solution")
    if isinstance(solution, str) and solution.strip():
        return last_boxed(solution) or NO_BOXED
    return NO_ANSWER


def prompt_messages(record: dict[str, Any], instruction: str | None) -> Messages | str:
    """The record's prompt turns, `instruction` appended to the last user turn, or the reason it has none."""
    raw = next((record[key] for key in PROMPT_FIELDS if record.get(key) is not None), None)
    if raw is None:
        return NO_PROMPT
    if isinstance(raw, str):
        raw = [{"role": USER, "content": raw}]
    if not isinstance(raw, list) or not raw:
        return BAD_PROMPT
    turns = []
    for turn in raw:
        if not isinstance(turn, dict) or not all(isinstance(turn.get(key), str) for key in ("role", "content")):
            return BAD_PROMPT
        if turn["role"] not in ROLES:
            return UNKNOWN_ROLE
        turns.append({"role": turn["role"], "content": turn["content"]})
    if turns[-1]["role"] == ASSISTANT:
        return ENDS_WITH_REPLY
    if not turns[-1]["content"].strip():
        return BAD_PROMPT
    if instruction:
        turns[-1]["content"] = f"{turns[-1]['content']} {instruction}"
    try:
        for turn in turns:
            turn["content"].encode("utf-8")
    except UnicodeEncodeError:
        return INVALID_UTF8
    return turns


def prompt_from_record(record: dict[str, Any], instruction: str | None = None) -> Prompt | str:
    """The prompt and answer a record holds, or the reason it holds none (see the module docstring)."""
    messages = prompt_messages(record, instruction)
    if isinstance(messages, str):
        return messages
    answer = reference_answer(record)
    if answer in (NO_ANSWER, NO_BOXED):
        return answer
    return Prompt(messages, answer)


def read_prompt_rows(spec: str) -> Iterator[ObjectRecord]:
    """The records of one `train` / `val` entry, in a fixed order; DataError (one line) for an unusable input."""
    if spec.startswith(PROMPTS_PREFIX):
        for index, record in enumerate(prompt_records_of(spec)):
            yield ObjectRecord(f"{spec}#{index}", record)
        return
    if spec.startswith(("builtin:", BUILTIN_CHAT, "builtin-pairs:")):
        raise DataError(f"{spec} holds no prompts with answers; the built-in prompts are {PROMPTS_PREFIX}arithmetic")
    yield from read_objects(spec, (), all_columns=True, not_text=_NOT_TEXT, missing="{path}")


# -- prompts -> tokens --------------------------------------------------------------------------------------


class EncodedPrompts:
    """A split's prompts: token ids back to back (prompt i is tokens[offsets[i]:offsets[i + 1]], int32, so a large
    set costs 4 bytes a token), with their text and reference answer."""

    def __init__(self) -> None:
        self._ids: list[np.ndarray] = []
        self.texts: list[str] = []
        self.answers: list[str] = []
        self.tokens = np.zeros(0, dtype=np.int32)
        self.offsets = np.zeros(1, dtype=np.int64)

    def add(self, ids: list[int], prompt: Prompt) -> None:
        self._ids.append(np.asarray(ids, dtype=np.int32))
        self.texts.append(prompt.text)
        self.answers.append(prompt.answer)

    def finish(self) -> EncodedPrompts:
        if self._ids:
            self.tokens = np.concatenate(self._ids)
            self.offsets = np.concatenate([[0], np.cumsum([len(ids) for ids in self._ids])]).astype(np.int64)
        self._ids = []
        return self

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def ids(self, index: int) -> list[int]:
        return self.tokens[self.offsets[index] : self.offsets[index + 1]].tolist()


class PromptSet(Dataset):
    """Map-style, so Lightning's distributed sampler shares it between processes; item i carries prompt_index i."""

    def __init__(self, prompts: EncodedPrompts) -> None:
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "prompt_ids": self.prompts.ids(index),
            "prompt_text": self.prompts.texts[index],
            "answer": self.prompts.answers[index],
            "prompt_index": index,
        }


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Lists stay lists (prompts unpadded, for the generator; text for the rewards); only `prompt_index` is a
    (B,) long tensor."""
    return {
        "prompt_ids": [item["prompt_ids"] for item in items],
        "prompt_text": [item["prompt_text"] for item in items],
        "answer": [item["answer"] for item in items],
        "prompt_index": torch.tensor([item["prompt_index"] for item in items], dtype=torch.long),
    }


# -- the datamodule -----------------------------------------------------------------------------------------


class PromptData(SplitLoaders, L.LightningDataModule):
    """Batches {prompt_ids: list[list[int]], prompt_text: list[str], answer: list[str], prompt_index: (B,)}.

    Args:
        train: `.jsonl` / `.parquet` files, globs, folders or URLs of prompt records, or
            `builtin-prompts:arithmetic?count=N`.
        val: the same for validation; None: hold out `val_fraction` of `train`.
        val_fraction: share of `train` held out when `val` is None, by a hash of each prompt (whatever the file
            order, seed or process count).
        tokenizer: the model's tokenizer (required).
        template: lays the prompt turns out as tokens, with the generation prompt (default: Tülu's).
        max_prompt_length: longest prompt in tokens (Moxin-Reasoning: 1024); longer ones are skipped, not cut (a
            cut question is another question).
        batch_size: prompts per batch, per process (each is sampled `group_size` times by the task).
        shuffle: visit the training prompts in a new order each epoch, drawn from (seed, epoch).
        seed: shuffling seed.
        instruction: text appended to the last prompt turn of every file record (not to built-in prompts, which
            carry their own).
        num_workers: DataLoader worker processes.
        max_seq_len, vocab_size: limits to check against; taken from the task's `model_config` when attached.

    After `setup`: `datasets` ({"train", "val"} -> PromptSet; `prompt_index` indexes its split), `skipped` and
    `skipped_examples` (per split and reason).
    """

    def __init__(
        self,
        train: list[str],
        val: list[str] | None = None,
        val_fraction: float = 0.0,
        tokenizer: Tokenizer | None = None,
        template: ChatTemplate = TULU,
        max_prompt_length: int = 1024,
        batch_size: int = 8,
        shuffle: bool = True,
        seed: int = 42,
        instruction: str | None = None,
        num_workers: int = 0,
        max_seq_len: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        if max_prompt_length < 2:
            raise ValueError(f"max_prompt_length={max_prompt_length} must be at least 2 (BOS and a prompt token)")
        check_arguments(
            "PromptData",
            train,
            val,
            val_fraction,
            tokenizer,
            max_prompt_length,
            batch_size,
            inputs="file, glob or builtin-prompts: input",
            two_tokens="BOS and a prompt token",
        )
        assert tokenizer is not None  # checked above; tells the type checker
        self.train_files, self.val_files, self.val_fraction = [str(t) for t in train], val, val_fraction
        self.tokenizer, self.template = tokenizer, template
        self.max_prompt_length = max_prompt_length
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.instruction, self.num_workers = instruction, num_workers
        self.max_seq_len, self.vocab_size = max_seq_len, vocab_size
        self.datasets: dict[str, PromptSet] = {}
        self.skipped: dict[str, Counter] = {}
        self.skipped_examples: dict[str, list[str]] = {}

    # -- setup --------------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        self.max_seq_len, self.vocab_size = model_limits(
            self.trainer, 0, self.tokenizer, self.max_seq_len, self.vocab_size
        )
        if self.max_seq_len is not None and self.max_prompt_length >= self.max_seq_len:
            raise ValueError(
                f"max_prompt_length={self.max_prompt_length} leaves no room for a response in the model's "
                f"max_seq_len={self.max_seq_len}; lower max_prompt_length"
            )
        if self.datasets:
            return
        splits = ["train"] + (["val"] if self.val_files is not None or self.val_fraction > 0 else [])
        prompts = {split: EncodedPrompts() for split in splits}
        self.skipped = {split: Counter() for split in splits}
        self.skipped_examples = {split: [] for split in splits}
        inputs = [("train", spec) for spec in self.train_files] + [("val", spec) for spec in self.val_files or []]
        for split, spec in inputs:
            instruction = None if spec.startswith(PROMPTS_PREFIX) else self.instruction
            for row in read_prompt_rows(spec):
                target, result = split, row.skip or prompt_from_record(row.value or {}, instruction)
                if isinstance(result, Prompt):
                    target = "val" if split == "train" and held_out(result.messages, self.val_fraction) else split
                    ids, _ = self.template.encode(self.tokenizer, result.messages, add_generation_prompt=True)
                    if len(ids) > self.max_prompt_length:
                        result = TOO_LONG
                    else:
                        prompts[target].add(ids, result)
                if isinstance(result, str):
                    count_skip(self.skipped[target], self.skipped_examples[target], row.where, result)
        for split in splits:
            if not len(prompts[split].finish()):
                raise ValueError(self._nothing_usable(split))
            self.datasets[split] = PromptSet(prompts[split])
        rank_zero_info(self.summary())

    def _nothing_usable(self, split: str) -> str:
        return nothing_usable(
            usable="usable prompt",
            check="the records' prompt and answer fields",
            split=split,
            train=self.train_files,
            val=self.val_files,
            val_fraction=self.val_fraction,
            max_length=self.max_prompt_length,
            skipped=self.skipped[split],
        ).replace("max_length", "max_prompt_length")

    def summary(self) -> str:
        """One line: prompts per split and what was skipped, and why."""
        splits = "; ".join(
            f"{split}: {len(prompts)} prompts; {skip_summary(self.skipped[split])}"
            for split, prompts in self.datasets.items()
        )
        return f"PromptData ({self.template.name} template, max_prompt_length {self.max_prompt_length}) {splits}"

    # -- loaders ------------------------------------------------------------------------------------------

    def collate(self) -> Any:
        return collate_prompts
