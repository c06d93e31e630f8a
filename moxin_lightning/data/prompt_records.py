"""Prompt records (a prompt and a reference answer) -> items of prompt ids, text and answer, for GRPO.

A record holds a prompt and a reference answer, under the names the common sets use:
  * the prompt: `prompt` (a string, one user turn, or a list of `{"role", "content"}` messages, as TRL and veRL
    store it), else `messages` (a list), else `question` (GSM8K) or `problem` (MATH, DeepScaleR), both strings;
  * the answer: `answer` (a string or number; GSM8K's worked answer ending in `#### N` gives N), else `solution`
    (MATH's), whose last `\\boxed{...}` gives the answer.
`instruction` (e.g. DeepScaleR's "Let's think step by step ...") is appended to the last turn of every file
record's prompt, after a space, as DeepScaleR does (not to built-in prompts, which carry their own).

A prompt is encoded by the chat template with its generation prompt (it ends with the header that asks for the
assistant's turn), so the policy continues it exactly as it would at inference. Its item is
`{"ids": int32, "text": str, "answer": str}` (`text`: the question as written, for rewards and logs). A record
that cannot be used (no prompt, a malformed one, one that ends with an assistant reply, no answer, or a prompt
longer than `max_prompt_length` tokens: a cut question is another question) is skipped and counted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from moxin_lightning.data.builtin_chat import PROMPTS_PREFIX, prompt_records_of
from moxin_lightning.data.records import Encoded, RecordFormat, encode_conversations
from moxin_lightning.data.sources import INVALID_UTF8, NOT_AN_OBJECT, ObjectRecord
from moxin_lightning.tokenizers.base import Tokenizer
from moxin_lightning.tokenizers.chat import ASSISTANT, ROLES, USER, ChatTemplate

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


class PromptFormat(RecordFormat):
    """`prepare --format prompts`: prompt records -> {"ids", "text", "answer"}; prompts longer than
    `max_prompt_length` tokens are skipped."""

    name = "prompts"
    builtin_prefixes = (PROMPTS_PREFIX,)
    not_text = "{path} is a .txt file; prompt records must be .jsonl, .json or .parquet"
    missing = "{path}"

    def __init__(
        self, tokenizer: Tokenizer, template: ChatTemplate, max_prompt_length: int, instruction: str | None = None
    ) -> None:
        super().__init__(tokenizer, template)
        if max_prompt_length < 2:
            raise ValueError(f"max_prompt_length={max_prompt_length} must be at least 2 (BOS and a prompt token)")
        self.max_prompt_length, self.instruction = max_prompt_length, instruction or None

    def settings(self) -> dict[str, Any]:
        return {"max_prompt_length": self.max_prompt_length, "instruction": self.instruction}

    def read_builtin(self, spec: str) -> Iterator[ObjectRecord]:
        for index, record in enumerate(prompt_records_of(spec)):
            yield ObjectRecord(f"{spec}#{index}", {**record, _BUILTIN: True})

    def parse(self, value: Any) -> Prompt | str:
        if not isinstance(value, dict):
            return NOT_AN_OBJECT
        return prompt_from_record(value, None if value.get(_BUILTIN) else self.instruction)

    def split_key(self, parsed: Prompt) -> Any:
        return parsed.messages

    def encode_parsed(self, parsed: list[Prompt]) -> list[Encoded | str]:
        encoded = encode_conversations(
            self.template, self.tokenizer, [p.messages for p in parsed], generation_prompt=True
        )
        out: list[Encoded | str] = []
        for prompt, (ids, _) in zip(parsed, encoded, strict=True):
            if len(ids) > self.max_prompt_length:
                out.append(TOO_LONG)
                continue
            item = {"ids": np.asarray(ids, dtype=np.int32), "text": prompt.text, "answer": prompt.answer}
            out.append(Encoded(item, len(ids)))
        return out


_BUILTIN = "__builtin__"  # marks built-in records, which carry their own instruction
