"""Preference records (a prompt, a chosen and a rejected response) -> items of token ids, for DPO.

Two record conventions are read:
  * `{"prompt": ..., "chosen": ..., "rejected": ...}` (TRL, UltraFeedback, Tülu 3's preference mixture);
  * `{"messages": [prompt turns], "chosen": ..., "rejected": ...}`.
A prompt is a string (one user turn) or a list of `{"role", "content"}` messages; a response is a string (one
assistant turn) or a list of messages. Response lists may hold only the response or repeat the prompt turns
first, and this is resolved the way TRL's `maybe_extract_prompt` does: when the prompt is not a message list,
the prompt is the turns chosen and rejected share (a string prompt is then only a fallback when they share
none); when it is, response lists that start with it have it removed.

`builtin-pairs:arithmetic?count=N` (optional `seed=S`) makes N offline pairs with nothing to download: the
correct and a wrong worked solution of the same generated arithmetic word problem (`builtin_chat`).

Each pair becomes two sequences, prompt + chosen and prompt + rejected, with the same prompt tokens; its item is
`{"prompt": int32, "chosen": int32, "chosen_trained": uint8, "rejected": int32, "rejected_trained": uint8}`. The
datamodule labels the response tokens only (`labels[t] = ids[t + 1]` when token t + 1 is an assistant token of
the response: content and closing EOS); assistant turns inside the prompt are context. A pair longer than
`max_length` is cut by its `truncation` rule: `prompt_first` (ours, TRL's default `keep_end` for the prompt) loses
prompt tokens from the left first (its BOS stays: the model has seen a BOS at position 0 in every sequence), then
response tokens from the right; `right` cuts each whole sequence, prompt + response, from the right, as the
open-instruct `dpo_tune.py` Moxin-Instruct ran did (a prompt of `max_length` tokens or more then leaves no response
token, and the pair is skipped). A record that cannot be used, or a pair left without a
response token, or a pair whose chosen and rejected responses are the same, is skipped and counted under its
reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import numpy as np

from moxin_lightning.data.builtin_chat import DEFAULT_ARITHMETIC_COUNT, arithmetic_problem, wrong_solution
from moxin_lightning.data.records import Encoded, RecordFormat, encode_conversations
from moxin_lightning.data.sources import INVALID_UTF8, NOT_AN_OBJECT, DataError, ObjectRecord
from moxin_lightning.losses import IGNORE_INDEX
from moxin_lightning.tokenizers.base import Tokenizer
from moxin_lightning.tokenizers.chat import ASSISTANT, ROLES, ChatTemplate

BUILTIN_PAIRS = "builtin-pairs:"

# Why a record gave no pair; the manifest and `PreferenceData.skipped` count under exactly these strings.
MISSING_RESPONSES = "missing chosen or rejected"
MALFORMED = "malformed prompt or response"
NO_PROMPT = "no prompt"
UNKNOWN_ROLE = "unknown role"
NOT_ASSISTANT = "response does not start with an assistant turn"
NO_RESPONSE_TOKEN = "no response token within max_length"
SAME_RESPONSES = "chosen equals rejected"

TRUNCATIONS = ("prompt_first", "right")

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Pair:
    """One preference example as messages: the shared prompt turns and each response's turns."""

    prompt: Messages
    chosen: Messages
    rejected: Messages


# -- records -> pairs ---------------------------------------------------------------------------------------


def _messages(value: Any, role: str) -> Messages | None:
    """A string as one `role` turn, or a message list reduced to role and content; None if it is neither."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        return None
    turns = []
    for message in value:
        if not isinstance(message, dict):
            return None
        turn = {"role": message.get("role"), "content": message.get("content")}
        if not isinstance(turn["role"], str) or not isinstance(turn["content"], str):
            return None
        turns.append(turn)
    return turns


def _is_utf8(messages: Messages) -> bool:
    """Lone surrogates (JSON `"\\ud800"`) cannot be encoded, so no tokenizer can take them."""
    try:
        for message in messages:
            message["content"].encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def pair_from_record(record: dict[str, Any]) -> Pair | str:
    """The pair a record holds, or the reason it holds none (see the module docstring for the conventions)."""
    if record.get("chosen") is None or record.get("rejected") is None:
        return MISSING_RESPONSES
    chosen, rejected = _messages(record["chosen"], "assistant"), _messages(record["rejected"], "assistant")
    raw_prompt = record.get("prompt") if record.get("prompt") is not None else record.get("messages")
    if chosen is None or rejected is None or not (raw_prompt is None or isinstance(raw_prompt, (str, list))):
        return MALFORMED
    if isinstance(raw_prompt, list):
        prompt = _messages(raw_prompt, "user")
        if prompt is None:
            return MALFORMED
        # TRL takes a message-list prompt with message-list responses as separate; responses repeating it lose it
        chosen = chosen[len(prompt) :] if chosen[: len(prompt)] == prompt else chosen
        rejected = rejected[len(prompt) :] if rejected[: len(prompt)] == prompt else rejected
    else:
        # TRL's extract_prompt: the turns both responses start with; each response keeps at least one turn
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            if raw_prompt is None:
                return NO_PROMPT
            prompt = [{"role": "user", "content": raw_prompt}]
    if not chosen or not rejected or chosen[0]["role"] != ASSISTANT or rejected[0]["role"] != ASSISTANT:
        return NOT_ASSISTANT
    turns = prompt + chosen + rejected
    if any(turn["role"] not in ROLES for turn in turns):
        return UNKNOWN_ROLE
    if not _is_utf8(turns):
        return INVALID_UTF8
    if chosen == rejected:  # no preference to learn: the loss would push nothing apart
        return SAME_RESPONSES
    return Pair(prompt, chosen, rejected)


# -- pairs -> tokens ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedPair:
    """A pair's tokens: the prompt (ending with the generation prompt), each response, and which response tokens
    are trained. Both sequences are prompt + response."""

    prompt: list[int]
    chosen: list[int]
    chosen_trained: list[bool]
    rejected: list[int]
    rejected_trained: list[bool]
    cut: bool = False  # truncated to max_length


def next_token_labels(ids: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """labels[t] = ids[t + 1] where token t + 1 is trained, else -100 (and -100 at the last position)."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(trained[1:], ids[1:], IGNORE_INDEX)
    return labels


def cut_pair(
    prompt: list[int],
    sequences: list[tuple[list[int], list[bool]]],
    bos_id: int,
    max_length: int,
    template_name: str,
    truncation: str = "prompt_first",
) -> EncodedPair | str:
    """A pair's tokens from the encodings of its prompt (with the generation prompt) and of prompt + each response,
    cut to `max_length` by `truncation` (`prompt_first`: the prompt from the left after its BOS, then responses
    from the right; `right`: each sequence from the right), or NO_RESPONSE_TOKEN when a sequence is left without a
    trained label."""
    responses = []
    for ids, trained in sequences:
        ids, trained = np.asarray(ids).tolist(), np.asarray(trained, dtype=bool).tolist()
        if ids[: len(prompt)] != list(prompt):
            raise DataError(  # a setting, not a failure: prepare's workers report it as one line
                f"chat template {template_name!r} does not encode a prompt with its generation prompt as the start "
                "of the prompt followed by a reply; preference data needs a template with that prefix property"
            )
        responses.append((ids[len(prompt) :], trained[len(prompt) :]))
    longest = max(len(ids) for ids, _ in responses)
    cut = len(prompt) + longest > max_length
    if cut and truncation == "right":
        prompt = prompt[:max_length]
        room = max_length - len(prompt)
        responses = [(ids[:room], trained[:room]) for ids, trained in responses]
    elif cut:
        head = prompt[:1] if prompt and prompt[0] == bos_id else []
        tail = max(0, max_length - longest - len(head))
        prompt = (head + (prompt[len(head) :][-tail:] if tail else []))[:max_length]
        room = max_length - len(prompt)
        responses = [(ids[:room], trained[:room]) for ids, trained in responses]
    for _, trained in responses:  # a label needs a trained token with a token before it
        if not any(trained[0 if prompt else 1 :]):
            return NO_RESPONSE_TOKEN
    (chosen, chosen_trained), (rejected, rejected_trained) = responses
    return EncodedPair(list(prompt), chosen, chosen_trained, rejected, rejected_trained, cut)


def encode_pair(
    pair: Pair, tokenizer: Tokenizer, template: ChatTemplate, max_length: int, truncation: str = "prompt_first"
) -> EncodedPair | str:
    """One pair's tokens (see `cut_pair`), encoded with `template.encode` directly."""
    prompt, _ = template.encode(tokenizer, pair.prompt, add_generation_prompt=True)
    sequences = [template.encode(tokenizer, pair.prompt + response) for response in (pair.chosen, pair.rejected)]
    return cut_pair(list(prompt), sequences, tokenizer.bos_id, max_length, template.name, truncation)


def builtin_rows(spec: str) -> Iterator[ObjectRecord]:
    """`builtin-pairs:arithmetic?count=N&seed=S`: problem i is builtin-chat:arithmetic's problem i of seed S, its
    correct worked solution chosen and a worked solution with one slip rejected."""
    name, _, query = spec.removeprefix(BUILTIN_PAIRS).partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    if name != "arithmetic" or set(options) - {"count", "seed"} or not all(v.isdigit() for v in options.values()):
        raise DataError(f"unknown {spec}; the built-in pairs are {BUILTIN_PAIRS}arithmetic?count=N&seed=S (optional)")
    count, seed = int(options.get("count", DEFAULT_ARITHMETIC_COUNT)), int(options.get("seed", 0))
    for index in range(count):
        problem = (seed << 32) + index
        question, solution, _ = arithmetic_problem(problem)
        wrong, _ = wrong_solution(problem)
        yield ObjectRecord(f"{spec}#{index}", {"prompt": question, "chosen": solution, "rejected": wrong})


class PreferenceFormat(RecordFormat):
    """`prepare --format preference`: pairs -> {"prompt", "chosen", "chosen_trained", "rejected",
    "rejected_trained"}, cut to `max_length` tokens per sequence by `truncation` (see `cut_pair`)."""

    name = "preference"
    builtin_prefixes = (BUILTIN_PAIRS,)
    needs = ("chosen", "rejected")
    not_text = "{path} is a .txt file; preference records must be .jsonl, .json or .parquet"
    missing = "{path} has no 'chosen' and 'rejected' columns (columns: {columns}); it holds no pairs"

    def __init__(
        self, tokenizer: Tokenizer, template: ChatTemplate, max_length: int, truncation: str = "prompt_first"
    ) -> None:
        super().__init__(tokenizer, template)
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be at least 2 (a prompt token and a response token)")
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation={truncation!r} is not one of {', '.join(TRUNCATIONS)}")
        self.max_length, self.truncation = max_length, truncation

    def settings(self) -> dict[str, Any]:
        return {"max_length": self.max_length, "truncation": self.truncation}

    def read_builtin(self, spec: str) -> Iterator[ObjectRecord]:
        yield from builtin_rows(spec)

    def parse(self, value: Any) -> Pair | str:
        return pair_from_record(value) if isinstance(value, dict) else NOT_AN_OBJECT

    def split_key(self, parsed: Pair) -> Any:
        return parsed.prompt  # every pair of one prompt lands on the same side

    def encode_parsed(self, parsed: list[Pair]) -> list[Encoded | str]:
        prompts = encode_conversations(
            self.template, self.tokenizer, [p.prompt for p in parsed], generation_prompt=True
        )
        full = encode_conversations(
            self.template, self.tokenizer, [p.prompt + r for p in parsed for r in (p.chosen, p.rejected)]
        )
        out: list[Encoded | str] = []
        for index, (prompt, _) in enumerate(prompts):
            pair = cut_pair(
                prompt.tolist(),
                full[2 * index : 2 * index + 2],
                self.tokenizer.bos_id,
                self.max_length,
                self.template.name,
                self.truncation,
            )
            if isinstance(pair, str):
                out.append(pair)
                continue
            item = {
                "prompt": np.asarray(pair.prompt, dtype=np.int32),
                "chosen": np.asarray(pair.chosen, dtype=np.int32),
                "chosen_trained": np.asarray(pair.chosen_trained, dtype=np.uint8),
                "rejected": np.asarray(pair.rejected, dtype=np.int32),
                "rejected_trained": np.asarray(pair.rejected_trained, dtype=np.uint8),
            }
            tokens = 2 * len(pair.prompt) + len(pair.chosen) + len(pair.rejected)
            trained = sum(pair.chosen_trained) + sum(pair.rejected_trained)
            out.append(Encoded(item, tokens, trained, pair.cut))
        return out
