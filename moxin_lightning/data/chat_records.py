"""Chat records (Tülu 3 `messages`) -> items of token ids and the assistant mask, for SFT.

A record is `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}` (Tülu 3's SFT
mixture, open-instruct's and TRL's conversational form; OpenR1-Math-220k's `messages` column), or ShareGPT's
`{"conversations": [{"from": "human" | "user" | "gpt" | "assistant" | "system", "value": str}, ...]}` with an
optional `system` string that opens the conversation (OpenThoughts-114k: `system` + `conversations`), from
.jsonl / .json / .parquet files or a built-in chat corpus (`builtin-chat:pydoc`,
`builtin-chat:arithmetic?count=2000`, see `builtin_chat`). A record with both reads `messages`.

`reasoning_markers` says how the replies' reasoning sections are written. `keep` (the default) takes turns as
written: OpenThoughts' replies keep their `<|begin_of_thought|>` ... `<|end_of_solution|>` sections, as its system
prompt asks for them. `think` rewrites them into the `<think> ... </think>` form OpenR1-Math-220k's replies and
DeepScaleR's prompts and reward use, since the GRPO that follows an SFT on these records scores a completion 0
unless it closes `</think>` (`moxin_lightning.rewards.ThinkThenAnswer`): in assistant turns `<|begin_of_thought|>`
becomes `<think>`, `<|end_of_thought|>` becomes `</think>`, and the solution markers are removed with the blank
lines they leave, keeping the solution text (see `think_form`); and a system turn that names any of those markers
is dropped (OpenThoughts' system prompt, which asks for them: it would contradict the rewritten replies, and
DeepScaleR's GRPO prompts carry no system prompt, as OpenR1's records do). User turns and other system turns are
untouched, as is a reply without the markers.

A conversation is encoded by the chat template (ids, and which ids are the assistant's) and cut to `max_length`
tokens. Its item is `{"ids": int32[n], "trained": uint8[n]}`; the datamodule turns `trained` into next-token labels
(`labels[t] = ids[t + 1]` where that token is the assistant's). A record that cannot be used (bad shape, unknown
role, no assistant turn, a conversation that opens with the assistant or ends on a user turn — a reply to nothing,
or a question with no answer — or no assistant token left within `max_length`) is skipped and counted under its
reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from moxin_lightning.data.builtin_chat import PREFIX as BUILTIN_CHAT
from moxin_lightning.data.builtin_chat import records_of
from moxin_lightning.data.records import Encoded, Messages, RecordFormat, encode_conversations
from moxin_lightning.data.sources import INVALID_UTF8, NOT_AN_OBJECT, ObjectRecord
from moxin_lightning.tokenizers.base import Tokenizer
from moxin_lightning.tokenizers.chat import ASSISTANT, ROLES, SYSTEM, USER, ChatTemplate

MESSAGES = "messages"
CONVERSATIONS, SYSTEM_FIELD = "conversations", "system"  # ShareGPT's form (OpenThoughts-114k)
SHAREGPT_ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "system": SYSTEM}
# Why a record was not trained on; the manifest and `ChatData.skipped` count skips under exactly these strings.
MISSING_MESSAGES = "missing messages"
BAD_MESSAGES = "messages not a non-empty list of {role, content: str}"
UNKNOWN_ROLE = "unknown role"
NO_ASSISTANT = "no assistant turn"
TRUNCATED = "no assistant token within max_length"
OPENS_WITH_ASSISTANT = "opens with the assistant (no prompt)"
ENDS_WITH_USER = "ends on a user turn (no reply)"

# How replies write their reasoning (see the module docstring): as written, or rewritten into the think form.
REASONING_MARKERS = ("keep", "think")
THOUGHT_MARKERS = {"<|begin_of_thought|>": "<think>", "<|end_of_thought|>": "</think>"}  # OpenThoughts' -> think
SOLUTION_MARKERS = ("<|begin_of_solution|>", "<|end_of_solution|>")  # OpenThoughts': removed
SOLUTION_OPEN = re.compile(re.escape(SOLUTION_MARKERS[0]) + r"\s*")
SOLUTION_CLOSE = re.compile(r"\s*" + re.escape(SOLUTION_MARKERS[1]))


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
    turns = [message["role"] for message in messages if message["role"] != SYSTEM]
    if turns[0] == ASSISTANT:
        return OPENS_WITH_ASSISTANT
    if turns[-1] == USER:
        return ENDS_WITH_USER
    return None


def sharegpt_messages(record: dict[str, Any]) -> Any:
    """ShareGPT's `conversations` (and `system`) as `messages`; what cannot be mapped is left for
    `messages_problem` to name (a turn that is no {from, value: str} object, an unknown speaker)."""
    turns, system = record[CONVERSATIONS], record.get(SYSTEM_FIELD)
    if not isinstance(turns, list) or not (system is None or isinstance(system, str)):
        return []  # not a conversation: BAD_MESSAGES
    messages: list[Any] = [{"role": SYSTEM, "content": system}] if system and system.strip() else []
    for turn in turns:
        if isinstance(turn, dict):
            speaker = turn.get("from")
            role = SHAREGPT_ROLES.get(speaker.lower(), speaker) if isinstance(speaker, str) else speaker
            turn = {"role": role, "content": turn.get("value")}
        messages.append(turn)
    return messages


def think_form(reply: str) -> str:
    """An OpenThoughts reply in the think form: `<|begin_of_thought|>` -> `<think>`, `<|end_of_thought|>` ->
    `</think>`, and `<|begin_of_solution|>` / `<|end_of_solution|>` removed with the blank lines after the first and
    before the second, so `...<|end_of_thought|>\\n\\n<|begin_of_solution|>\\n\\nS\\n\\n<|end_of_solution|>` ends
    `...</think>\\n\\nS`: the answer follows `</think>`, where DeepScaleR's reward grades it."""
    for marker, tag in THOUGHT_MARKERS.items():
        reply = reply.replace(marker, tag)
    return SOLUTION_CLOSE.sub("", SOLUTION_OPEN.sub("", reply))


def with_think_markers(messages: Messages) -> Messages:
    """`messages` with every assistant turn in the think form (`think_form`) and every system turn that names an
    OpenThoughts marker dropped: it asks for the sections the replies no longer have."""
    markers = (*THOUGHT_MARKERS, *SOLUTION_MARKERS)
    out: Messages = []
    for message in messages:
        if message["role"] == ASSISTANT:
            message = {**message, "content": think_form(message["content"])}
        elif message["role"] == SYSTEM and any(marker in message["content"] for marker in markers):
            continue
        out.append(message)
    return out


def trainable_tokens(trained: list[bool] | np.ndarray) -> int:
    """Labels a conversation yields: tokens that are the assistant's and have a token before them."""
    return int(np.count_nonzero(trained[1:]))


class ChatFormat(RecordFormat):
    """`prepare --format chat`: conversations -> {"ids", "trained"}, cut to `max_length` tokens, their reasoning
    markers kept as written or rewritten into the think form by `reasoning_markers` (see the module docstring)."""

    name = "chat"
    builtin_prefixes = (BUILTIN_CHAT,)
    needs = ((MESSAGES, CONVERSATIONS),)
    optional = (SYSTEM_FIELD,)
    all_columns = False
    not_text = "{path} is a .txt file; chat records need .jsonl, .json or .parquet with a 'messages' field"
    missing = (
        "{path} has no column 'messages' (columns: {columns}); chat records need one, or ShareGPT's 'conversations'"
    )

    def __init__(
        self, tokenizer: Tokenizer, template: ChatTemplate, max_length: int, reasoning_markers: str = "keep"
    ) -> None:
        super().__init__(tokenizer, template)
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be at least 2 (a token and the one it predicts)")
        if reasoning_markers not in REASONING_MARKERS:
            raise ValueError(f"reasoning_markers={reasoning_markers!r} is not one of {', '.join(REASONING_MARKERS)}")
        self.max_length, self.reasoning_markers = max_length, reasoning_markers

    def settings(self) -> dict[str, Any]:
        return {"max_length": self.max_length, "reasoning_markers": self.reasoning_markers}

    def read_builtin(self, spec: str) -> Iterator[ObjectRecord]:
        for index, record in enumerate(records_of(spec)):
            yield ObjectRecord(f"{spec}#{index}", record)

    def parse(self, value: Any) -> Messages | str:
        if not isinstance(value, dict):
            return NOT_AN_OBJECT
        messages = value.get(MESSAGES)
        if messages is None and value.get(CONVERSATIONS) is not None:
            messages = sharegpt_messages(value)
        problem = messages_problem(messages)
        if problem:
            return problem
        messages = [{"role": message["role"], "content": message["content"]} for message in messages]
        return with_think_markers(messages) if self.reasoning_markers == "think" else messages

    def split_key(self, parsed: Messages) -> Any:
        return parsed

    def encode_parsed(self, parsed: list[Messages]) -> list[Encoded | str]:
        out: list[Encoded | str] = []
        for ids, trained in encode_conversations(self.template, self.tokenizer, parsed):
            truncated = len(ids) > self.max_length
            ids, trained = ids[: self.max_length], trained[: self.max_length]
            count = trainable_tokens(trained)
            if count == 0:
                out.append(TRUNCATED)
                continue
            item = {"ids": ids.astype(np.int32, copy=False), "trained": trained.astype(np.uint8)}
            out.append(Encoded(item, len(ids), count, truncated))
        return out
