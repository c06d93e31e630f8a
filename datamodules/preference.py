"""`PreferenceData`: DPO pairs (a prompt, a chosen and a rejected response), tokenized with a chat template.

Records come from `.jsonl` (optionally compressed) or `.parquet` files, local or fsspec URLs, listed as for
`prepare --input` (paths, globs, folders). Two conventions are read:
  * `{"prompt": ..., "chosen": ..., "rejected": ...}` (TRL, UltraFeedback, Tülu 3's preference mixture);
  * `{"messages": [prompt turns], "chosen": ..., "rejected": ...}`.
A prompt is a string (one user turn) or a list of `{"role", "content"}` messages; a response is a string (one
assistant turn) or a list of messages. Response lists may hold only the response or repeat the prompt turns
first, and this is resolved the way TRL's `maybe_extract_prompt` does: when the prompt is not a message list,
the prompt is the turns chosen and rejected share (a string prompt is then only a fallback when they share
none); when it is, response lists that start with it have it removed.

`builtin-pairs:arithmetic?count=N` (optional `seed=S`) makes N offline pairs with nothing to download: the
correct and a wrong worked solution of the same generated arithmetic word problem
(`moxin_lightning.data.builtin_chat`).

Each pair becomes two sequences, prompt + chosen and prompt + rejected, with the same prompt tokens. Labels are
next-token targets on response tokens only: `labels[t] = ids[t + 1]` when token t + 1 is an assistant token of
the response (the template decides which: content and closing EOS), else -100. Assistant turns inside the prompt
are context and are not trained. A pair longer than `max_length` loses prompt tokens from the left first (its
BOS stays: the model has seen a BOS at position 0 in every sequence), then response tokens from the right. A
record that cannot be used, or a pair left without a response token, is skipped and counted in `skipped`. (As the
prompt goes first, a pair loses every response label only when `max_length` leaves no room past the untrained
tokens a reply starts with: none for Tülu's template, whose generation prompt holds the assistant header.)
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from datamodules.chat import held_out
from datamodules.checks import check_arguments, model_limits
from datamodules.loaders import SplitLoaders
from datamodules.skips import count_skip, nothing_usable, skip_summary
from moxin_lightning.data.builtin_chat import DEFAULT_ARITHMETIC_COUNT, arithmetic_problem, wrong_solution
from moxin_lightning.data.builtin_chat import PREFIX as BUILTIN_CHAT
from moxin_lightning.data.sources import BAD_JSON as BAD_JSON  # re-exported: the skips of a record
from moxin_lightning.data.sources import INVALID_UTF8, DataError, ObjectRecord, read_objects
from moxin_lightning.data.sources import NOT_AN_OBJECT as NOT_AN_OBJECT
from moxin_lightning.losses import IGNORE_INDEX
from moxin_lightning.tokenizers import Tokenizer
from moxin_lightning.tokenizers.chat import ASSISTANT, ROLES, TULU, ChatTemplate

BUILTIN_PAIRS = "builtin-pairs:"

# Why a record gave no pair; `PreferenceData.skipped` counts under exactly these strings.
MISSING_RESPONSES = "missing chosen or rejected"
MALFORMED = "malformed prompt or response"
NO_PROMPT = "no prompt"
UNKNOWN_ROLE = "unknown role"
NOT_ASSISTANT = "response does not start with an assistant turn"
NO_RESPONSE_TOKEN = "no response token within max_length"
_NOT_TEXT = "{path} is a .txt file; preference records must be .jsonl or .parquet"
_NO_PAIRS = "{path} has no 'chosen' and 'rejected' columns (columns: {columns}); it holds no pairs"

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


def encode_pair(pair: Pair, tokenizer: Tokenizer, template: ChatTemplate, max_length: int) -> EncodedPair | str:
    """The pair's tokens cut to `max_length` (prompt from the left after its BOS, then responses from the right),
    or NO_RESPONSE_TOKEN when a sequence is left without a trained label."""
    prompt, _ = template.encode(tokenizer, pair.prompt, add_generation_prompt=True)
    responses = []
    for response in (pair.chosen, pair.rejected):
        ids, trained = template.encode(tokenizer, pair.prompt + response)
        if list(ids[: len(prompt)]) != list(prompt):
            raise ValueError(
                f"chat template {template.name!r} does not encode a prompt with its generation prompt as the start "
                "of the prompt followed by a reply; PreferenceData needs a template with that prefix property"
            )
        responses.append((list(ids[len(prompt) :]), list(trained[len(prompt) :])))
    longest = max(len(ids) for ids, _ in responses)
    cut = len(prompt) + longest > max_length
    if cut:
        head = prompt[:1] if prompt and prompt[0] == tokenizer.bos_id else []
        tail = max(0, max_length - longest - len(head))
        prompt = (head + (prompt[len(head) :][-tail:] if tail else []))[:max_length]
        room = max_length - len(prompt)
        responses = [(ids[:room], trained[:room]) for ids, trained in responses]
    for _, trained in responses:  # a label needs a trained token with a token before it
        if not any(trained[0 if prompt else 1 :]):
            return NO_RESPONSE_TOKEN
    (chosen, chosen_trained), (rejected, rejected_trained) = responses
    return EncodedPair(list(prompt), chosen, chosen_trained, rejected, rejected_trained, cut)


class EncodedPairs:
    """The pairs of a split back to back in flat arrays (a large mixture costs 5 bytes per token, the prompt
    stored once): pair i is segments 3i (prompt), 3i + 1 (chosen) and 3i + 2 (rejected) of `tokens` / `trained`,
    segment k being [offsets[k], offsets[k + 1])."""

    def __init__(self) -> None:
        self._segments: list[tuple[np.ndarray, np.ndarray]] = []
        self.tokens = np.zeros(0, dtype=np.int32)
        self.trained = np.zeros(0, dtype=bool)
        self.offsets = np.zeros(1, dtype=np.int64)
        self.truncated = 0  # kept, but cut to max_length

    def add(self, pair: EncodedPair) -> None:
        for ids, trained in (
            (pair.prompt, [False] * len(pair.prompt)),
            (pair.chosen, pair.chosen_trained),
            (pair.rejected, pair.rejected_trained),
        ):
            self._segments.append((np.asarray(ids, dtype=np.int32), np.asarray(trained, dtype=bool)))
        self.truncated += pair.cut

    def finish(self) -> EncodedPairs:
        if self._segments:
            self.tokens = np.concatenate([ids for ids, _ in self._segments])
            self.trained = np.concatenate([trained for _, trained in self._segments])
            lengths = [len(ids) for ids, _ in self._segments]
            self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._segments = []
        return self

    def __len__(self) -> int:
        return (len(self.offsets) - 1) // 3

    def _segment(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.tokens[start:end].astype(np.int64), self.trained[start:end]

    def sequences(self, index: int) -> dict[str, np.ndarray]:
        """Ids and next-token labels of pair `index`'s chosen and rejected sequences."""
        prompt, _ = self._segment(3 * index)
        pair = {}
        for side, segment in (("chosen", 3 * index + 1), ("rejected", 3 * index + 2)):
            response, trained = self._segment(segment)
            ids = np.concatenate([prompt, response])
            pair[f"{side}_input_ids"] = ids
            pair[f"{side}_labels"] = next_token_labels(ids, np.concatenate([np.zeros(len(prompt), bool), trained]))
        return pair

    def digest(self, header: str) -> str:
        """sha256 of `header` and every pair's tokens, trained flags and boundaries, in order."""
        digest = hashlib.sha256(header.encode())
        for array in (self.offsets.astype("<i8"), self.tokens.astype("<i4"), self.trained.astype("u1")):
            digest.update(len(array).to_bytes(8, "little"))
            digest.update(array.tobytes())
        return digest.hexdigest()


# -- reading ------------------------------------------------------------------------------------------------


Row = ObjectRecord  # one record of an input: an object, or the reason it is not one


def read_rows(spec: str) -> Iterator[Row]:
    """The records of one `train` / `val` entry, in a fixed order; DataError (one line) for an unusable file."""
    if spec.startswith(BUILTIN_PAIRS):
        yield from builtin_rows(spec)
        return
    if spec.startswith(("builtin:", BUILTIN_CHAT)):
        raise DataError(f"{spec} holds no preference pairs; the built-in pairs are {BUILTIN_PAIRS}arithmetic?count=N")
    yield from read_objects(spec, ("chosen", "rejected"), all_columns=True, not_text=_NOT_TEXT, missing=_NO_PAIRS)


def builtin_rows(spec: str) -> Iterator[Row]:
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
        yield Row(f"{spec}#{index}", {"prompt": question, "chosen": solution, "rejected": wrong})


# -- torch side ---------------------------------------------------------------------------------------------


class PairDataset(Dataset):
    """Map-style, so Lightning's distributed sampler shares it between processes; item i carries pair_index i."""

    def __init__(self, pairs: EncodedPairs) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.pairs.sequences(index), "pair_index": index}


class PadPairs:
    """Collate: chosen and rejected right-padded to one length, the batch's longest or `length` when set."""

    def __init__(self, pad_id: int, length: int | None = None) -> None:
        self.pad_id, self.length = pad_id, length

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(item[key]) for item in items for key in ("chosen_input_ids", "rejected_input_ids"))
        length = self.length or longest
        batch = {}
        for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            filler = IGNORE_INDEX if key.endswith("labels") else self.pad_id
            rows = torch.full((len(items), length), filler, dtype=torch.long)
            for row, item in zip(rows, items, strict=True):
                row[: len(item[key])] = torch.from_numpy(item[key])
            batch[key] = rows
        batch["pair_index"] = torch.tensor([item["pair_index"] for item in items], dtype=torch.long)
        return batch


# -- the datamodule -----------------------------------------------------------------------------------------


class PreferenceData(SplitLoaders, L.LightningDataModule):
    """Batches {chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels: (B, T), pair_index: (B,)}.

    Args:
        train: `.jsonl` / `.parquet` files, globs, folders or URLs of pair records, or
            `builtin-pairs:arithmetic?count=N`.
        val: the same for validation; None: hold out `val_fraction` of `train`.
        val_fraction: share of `train` held out when `val` is None, by a hash of each pair's prompt (so every
            pair of one prompt lands on the same side, whatever the file order, seed or process count).
        tokenizer: the model's tokenizer (required).
        template: lays the turns out as tokens (default: Tülu's, as Moxin-Instruct).
        max_length: tokens per sequence (Moxin's DPO: 2048); longer pairs are cut (see the module docstring).
        batch_size: pairs per batch (per process).
        shuffle: visit the training pairs in a new order each epoch, drawn from (seed, epoch).
        seed: shuffling seed.
        num_workers: DataLoader worker processes.
        pad_to_max_length: pad every batch to `max_length` (fixed shapes) instead of its longest sequence.
        max_seq_len, vocab_size: limits to check against; taken from the task's `model_config` when attached.

    After `setup`: `datasets` ({"train", "val"} -> PairDataset; `pair_index` indexes its split), `skipped`
    (per split and reason), `truncated` (pairs cut, per split) and `fingerprint` (of the training pairs).
    """

    def __init__(
        self,
        train: list[str],
        val: list[str] | None = None,
        val_fraction: float = 0.0,
        tokenizer: Tokenizer | None = None,
        template: ChatTemplate = TULU,
        max_length: int = 2048,
        batch_size: int = 8,
        shuffle: bool = True,
        seed: int = 42,
        num_workers: int = 0,
        pad_to_max_length: bool = False,
        max_seq_len: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        check_arguments(
            "PreferenceData",
            train,
            val,
            val_fraction,
            tokenizer,
            max_length,
            batch_size,
            inputs="file, glob or builtin-pairs: input",
            two_tokens="a prompt token and a response token",
        )
        assert tokenizer is not None  # checked above; tells the type checker
        self.train_files, self.val_files, self.val_fraction = [str(t) for t in train], val, val_fraction
        self.tokenizer, self.template = tokenizer, template
        self.max_length, self.pad_to_max_length = max_length, pad_to_max_length
        self.batch_size, self.shuffle, self.seed, self.num_workers = batch_size, shuffle, seed, num_workers
        self.max_seq_len, self.vocab_size = max_seq_len, vocab_size
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
        self.datasets: dict[str, PairDataset] = {}
        self.skipped: dict[str, Counter] = {}
        self.skipped_examples: dict[str, list[str]] = {}
        self._fingerprints: dict[str, str] = {}

    # -- setup --------------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        self.max_seq_len, self.vocab_size = model_limits(
            self.trainer, self.max_length, self.tokenizer, self.max_seq_len, self.vocab_size
        )
        if self.datasets:
            return
        splits = ["train"] + (["val"] if self.val_files is not None or self.val_fraction > 0 else [])
        pairs = {split: EncodedPairs() for split in splits}
        self.skipped = {split: Counter() for split in splits}
        self.skipped_examples = {split: [] for split in splits}
        inputs = [("train", spec) for spec in self.train_files] + [("val", spec) for spec in self.val_files or []]
        for split, spec in inputs:
            for row in read_rows(spec):
                target, result = split, row.skip or pair_from_record(row.value)
                if isinstance(result, Pair):
                    target = "val" if split == "train" and held_out(result.prompt, self.val_fraction) else split
                    result = encode_pair(result, self.tokenizer, self.template, self.max_length)
                if isinstance(result, str):
                    self._skip(target, row.where, result)
                else:
                    pairs[target].add(result)
        for split in splits:
            if not len(pairs[split].finish()):
                raise ValueError(self._nothing_usable(split))
            self.datasets[split] = PairDataset(pairs[split])
        rank_zero_info(self.summary())

    def _skip(self, split: str, where: str, reason: str) -> None:
        count_skip(self.skipped[split], self.skipped_examples[split], where, reason)

    def _nothing_usable(self, split: str) -> str:
        return nothing_usable(
            usable="usable preference pair",
            check="the records' prompt/chosen/rejected fields",
            split=split,
            train=self.train_files,
            val=self.val_files,
            val_fraction=self.val_fraction,
            max_length=self.max_length,
            skipped=self.skipped[split],
        )

    def summary(self) -> str:
        """One line: pairs per split, how many were cut, what was skipped and why."""
        parts = []
        for split, dataset in self.datasets.items():
            skipped = skip_summary(self.skipped[split])
            parts.append(f"{split}: {len(dataset)} pairs ({dataset.pairs.truncated} cut); {skipped}")
        return f"PreferenceData ({self.template.name} template, max_length {self.max_length}) " + "; ".join(parts)

    # -- identity -----------------------------------------------------------------------------------------

    def split_fingerprint(self, split: str) -> str:
        """sha256 of a split's tokenized pairs in pair_index order, the template's name, max_length and the
        tokenizer: what reference log-probs computed on that split depend on, besides the model."""
        if split not in self._fingerprints:
            header = f"{self.template.name}|{self.max_length}|{self.tokenizer.fingerprint}"
            self._fingerprints[split] = self._dataset(split).pairs.digest(header)
        return self._fingerprints[split]

    @property
    def fingerprint(self) -> str:
        """The training pairs' fingerprint (the data part of a reference-log-prob cache key)."""
        return self.split_fingerprint("train")

    # -- loaders ------------------------------------------------------------------------------------------

    def collate(self) -> PadPairs:
        return PadPairs(self.pad_id, self.max_length if self.pad_to_max_length else None)

    def pair_count(self, split: str = "train") -> int:
        return len(self._dataset(split))

    def ordered_dataloader(self, split: str = "train", rank: int = 0, world_size: int = 1) -> DataLoader:
        """A split's pairs in pair_index order, not shuffled (e.g. to fill a reference-log-prob cache); with
        `world_size` > 1, process `rank`'s share: pairs rank, rank + world_size, ..., the last one repeated so that
        every process runs as many batches (sharded models need all processes in each forward)."""
        dataset = self._dataset(split)
        if world_size == 1:
            return self._loader(dataset, shuffle=False)
        share = list(range(rank, len(dataset), world_size)) or [len(dataset) - 1]
        share += share[-1:] * (-(-len(dataset) // world_size) - len(share))
        return self._loader(torch.utils.data.Subset(dataset, share), shuffle=False)
