"""Chat data for SFT: the Tülu template, batched encoding equal to the template's, assistant-only labels, packing
equal to unpacked, skips and refusals, `prepare --format chat` through the command line, the built-in offline chat
corpus and the split of the records between two processes."""

import gzip
import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from moxin_lightning.data import read_manifest
from moxin_lightning.data.builtin_chat import (
    arithmetic_problem,
    chat_records,
    pydoc_sections,
    trimmed,
    write_jsonl,
    wrong_solution,
)
from moxin_lightning.data.chat_records import BAD_MESSAGES, MISSING_MESSAGES, NO_ASSISTANT, TRUNCATED, UNKNOWN_ROLE
from moxin_lightning.data.prepare import prepare
from moxin_lightning.data.records import encode_conversations, template_fingerprint
from moxin_lightning.data.sources import BAD_JSON, DataError
from moxin_lightning.datamodules.chat import ChatCollator, ChatData, pack_rows
from moxin_lightning.losses import IGNORE_INDEX
from moxin_lightning.tokenizers import SentencePieceTokenizer, train_tokenizer
from moxin_lightning.tokenizers.chat import TuluTemplate
from tests.prepared_data import fresh_environment, write_records

from .conftest import tiny_model

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is a list?"},
    {"role": "assistant", "content": "A mutable sequence."},
    {"role": "user", "content": "And a tuple?"},
    {"role": "assistant", "content": "An immutable one."},
]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Raw records are prepared on first use into $MOXIN_CACHE/records: this module's own cache, not ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOXIN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    """A 400-piece BPE trained in a few milliseconds on pydoc text and the template's headers."""
    texts = [section.body for section in pydoc_sections()[:60]] + ["<|system|>\n<|user|>\n<|assistant|>\n"] * 20
    folder = train_tokenizer(iter(texts), 400, tmp_path_factory.mktemp("chat-tokenizer"), progress=False, minloglevel=2)
    return SentencePieceTokenizer(folder)


def user_assistant(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def chat_data(files, tokenizer, **kwargs) -> ChatData:
    data = ChatData(list(files), tokenizer=tokenizer, **{"max_length": 256, "batch_size": 4, **kwargs})
    data.setup("fit")
    return data


def items(data, split: str = "train") -> list[dict]:
    """A split's items in index order (what prepare wrote: one per usable record, in input order)."""
    stream = data.streams[split]
    return [stream[index] for index in range(data.count(split))]


def item_lists(data, split: str = "train") -> list[tuple[list[int], list[int]]]:
    return [(item["ids"].tolist(), item["trained"].tolist()) for item in items(data, split)]


# ------------------------------------------------------------------------------------------------------ template


def test_tulu_template_encodes_exactly_the_expected_ids(tokenizer):
    ids, trained = TuluTemplate().encode(tokenizer, CONVERSATION)

    def enc(text):
        return tokenizer.encode(text, bos=False, eos=False)

    prompt1 = enc("<|system|>\nYou are terse.\n<|user|>\nWhat is a list?\n<|assistant|>\n")
    reply1 = enc("A mutable sequence.")
    prompt2 = enc("\n<|user|>\nAnd a tuple?\n<|assistant|>\n")
    reply2 = enc("An immutable one.")
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    assert ids == [bos, *prompt1, *reply1, eos, *prompt2, *reply2, eos]
    assert trained == [False] * (1 + len(prompt1)) + [True] * (len(reply1) + 1) + [False] * len(prompt2) + [True] * (
        len(reply2) + 1
    )
    # the trained tokens are exactly the replies and their EOS
    trained_ids = [i for i, t in zip(ids, trained, strict=True) if t]
    assert trained_ids == [*reply1, eos, *reply2, eos]
    assert tokenizer.decode(reply1) == "A mutable sequence." and tokenizer.decode(reply2) == "An immutable one."
    # a generation prompt is the very prefix training saw before each reply
    prompt_ids, prompt_trained = TuluTemplate().encode(tokenizer, CONVERSATION[:2], add_generation_prompt=True)
    assert prompt_ids == [bos, *prompt1] and not any(prompt_trained)
    second, _ = TuluTemplate().encode(tokenizer, CONVERSATION[:4], add_generation_prompt=True)
    assert second == ids[: len(second)] and len(second) == 1 + len(prompt1) + len(reply1) + 1 + len(prompt2)


def test_template_refuses_unknown_roles(tokenizer):
    with pytest.raises(ValueError, match=r"^message 1 has role 'tool' and content of type str; the Tülu template"):
        TuluTemplate().encode(tokenizer, [CONVERSATION[1], {"role": "tool", "content": "x"}])


class ChatMLTemplate:
    """A layout of another family (ChatML's): each message is its own pieces (a header, the content even when empty,
    a footer), the EOS id after each reply. Written here to show the batched encoding is not Tülu-specific."""

    name = "chatml"

    def encode(self, tokenizer, messages, *, add_generation_prompt=False):
        ids, trained = [tokenizer.bos_id], [False]

        def piece(text: str, is_trained: bool) -> None:
            encoded = tokenizer.encode(text, bos=False, eos=False)
            ids.extend(encoded)
            trained.extend([is_trained] * len(encoded))

        for message in messages:
            reply = message["role"] == "assistant"
            piece(f"<|im_start|>{message['role']}\n", False)
            piece(message["content"], reply)
            if reply:
                ids.append(tokenizer.eos_id)
                trained.append(True)
            piece("<|im_end|>\n", False)
        if add_generation_prompt:
            piece("<|im_start|>assistant\n", False)
        return ids, trained


class SpacedTulu:
    """Tülu's name, but a blank line after each prompt header: another layout under the same name."""

    name = "tulu"

    def encode(self, tokenizer, messages, *, add_generation_prompt=False):
        spaced = [m if m["role"] == "assistant" else {**m, "content": f"\n{m['content']}"} for m in messages]
        return TuluTemplate().encode(tokenizer, spaced, add_generation_prompt=add_generation_prompt)


class CountingTokenizer:
    """The tokenizer, counting its `encode` and `encode_batch` calls."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.calls = tokenizer, Counter()

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def encode(self, text, *, bos=False, eos=False):
        self.calls["encode"] += 1
        return self.tokenizer.encode(text, bos=bos, eos=eos)

    def encode_batch(self, texts):
        self.calls["encode_batch"] += 1
        return self.tokenizer.encode_batch(texts)


VARIED = [
    CONVERSATION,
    user_assistant("Hi?", "Hello.")["messages"],
    [
        {"role": "system", "content": "Réponds en français. 世界 🚀"},
        {"role": "user", "content": "Qu'est-ce qu'un café ? naïve — œuvre"},
        {"role": "assistant", "content": "Une boisson ☕, ou un lieu. ∑ ≠ ∞"},
    ],
    [m for i in range(3) for m in user_assistant(f"Step {i}?", f"Done {i}.")["messages"]],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": " "}],
    [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
    [{"role": "assistant", "content": "I speak first."}],
    [
        {"role": "user", "content": "One."},
        {"role": "user", "content": "Two."},
        {"role": "assistant", "content": "Three."},
    ],
    [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}],
    [{"role": "user", "content": "<|user|>\nnot a header"}, {"role": "assistant", "content": "<|assistant|>\n</s>"}],
    [{"role": "user", "content": "  \n\t "}, {"role": "assistant", "content": "\n\nspaced\n\n"}],
    [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok " * 30}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A question without a reply"}],
]


def test_batched_encoding_equals_the_templates_own_encoding(tokenizer):
    """encode_conversations (every text piece of the batch in one tokenizer call) gives exactly the ids and trained
    flags of template.encode, conversation by conversation, for Tülu's layout and for another one."""
    assert len(VARIED) >= 12
    for template in (TuluTemplate(), ChatMLTemplate()):
        for generation_prompt in (False, True):
            expected = [
                template.encode(tokenizer, messages, add_generation_prompt=generation_prompt) for messages in VARIED
            ]
            counting = CountingTokenizer(tokenizer)
            batched = encode_conversations(template, counting, VARIED, generation_prompt=generation_prompt)
            as_lists = [(ids.tolist(), trained.tolist()) for ids, trained in batched]
            assert as_lists == [(list(ids), list(trained)) for ids, trained in expected], (
                template.name,
                generation_prompt,
            )
            assert counting.calls == {"encode_batch": 1}  # one call for the whole batch, none per piece
            assert all(ids.dtype == np.int32 and trained.dtype == bool for ids, trained in batched)
        assert encode_conversations(template, tokenizer, []) == []
    tulu, chatml = (encode_conversations(t, tokenizer, VARIED) for t in (TuluTemplate(), ChatMLTemplate()))
    assert all(a.tolist() != b.tolist() for (a, _), (b, _) in zip(tulu, chatml, strict=True))  # layouts differ


def test_template_fingerprint_identifies_the_layout_not_the_instance():
    assert template_fingerprint(TuluTemplate()) == template_fingerprint(TuluTemplate())
    assert re.fullmatch(r"[0-9a-f]{64}", template_fingerprint(TuluTemplate()))
    assert SpacedTulu.name == TuluTemplate.name
    assert template_fingerprint(SpacedTulu()) != template_fingerprint(TuluTemplate())  # same name, other layout
    assert template_fingerprint(ChatMLTemplate()) != template_fingerprint(TuluTemplate())

    class Renamed(TuluTemplate):
        name = "tulu-renamed"

    assert template_fingerprint(Renamed()) != template_fingerprint(TuluTemplate())  # the name counts too


# ------------------------------------------------------------------------------------------------------- labels


def test_labels_are_the_next_assistant_token_and_ignored_elsewhere(tokenizer, tmp_path):
    records = [{"messages": CONVERSATION}, user_assistant("Name a number.", "Seven.")]
    data = chat_data([write_records(tmp_path / "chat.jsonl", records)], tokenizer, pack=False, shuffle=False)
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (2, len(TuluTemplate().encode(tokenizer, CONVERSATION)[0]))
    for row, record in enumerate(records):
        ids, trained = TuluTemplate().encode(tokenizer, record["messages"])
        expected = [ids[t + 1] if trained[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
        width = batch["input_ids"].shape[1]
        padding = width - len(ids)
        assert batch["input_ids"][row].tolist() == ids + [tokenizer.pad_id] * padding
        assert batch["labels"][row].tolist() == expected + [IGNORE_INDEX] * padding
        assert batch["positions"][row, : len(ids)].tolist() == list(range(len(ids)))
        assert batch["doc_ids"][row].tolist() == [0] * len(ids) + [1] * padding
    # trained labels: every assistant reply token and each reply's EOS, nothing else
    reply_tokens = sum(len(tokenizer.encode(m["content"])) + 1 for m in CONVERSATION if m["role"] == "assistant")
    assert int((batch["labels"][0] != IGNORE_INDEX).sum()) == reply_tokens
    assert data.split_entry("train")["trained_tokens"] == reply_tokens + len(tokenizer.encode("Seven.")) + 1


def test_collate_refuses_a_batch_without_assistant_tokens():
    untrained = [{"ids": np.arange(4, dtype=np.int32), "trained": np.zeros(4, dtype=np.uint8)}]
    for pack in (False, True):
        with pytest.raises(ValueError, match=r"^a chat batch has no assistant token to train on; every conversation"):
            ChatCollator(pad_id=0, max_length=8, pack=pack)(untrained)


# ------------------------------------------------------------------------------------------------------ packing


def test_pack_rows_is_greedy_and_keeps_conversations_whole():
    """Packing is per batch, in the batch's order (the loader's shuffle made it): the old whole-epoch packing with
    an `order` argument is gone."""
    assert pack_rows([5, 4, 3, 8, 2, 10], 10) == [[0, 1], [2], [3, 4], [5]]
    assert pack_rows([10, 10], 10) == [[0], [1]] and pack_rows([], 10) == []
    lengths = [5, 4, 3, 8, 2, 10]
    conversations = [
        {"ids": np.arange(10 * k + 1, 10 * k + 1 + n, dtype=np.int32), "trained": np.array([0] + [1] * (n - 1))}
        for k, n in enumerate(lengths)
    ]
    packed = ChatCollator(pad_id=0, max_length=10, pack=True)(conversations)
    assert {name: tuple(t.shape) for name, t in packed.items()} == {
        name: (4, 10) for name in ("input_ids", "labels", "doc_ids", "positions")
    }
    assert packed["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 11, 12, 13, 14, 0]
    assert packed["labels"][0].tolist() == [2, 3, 4, 5, IGNORE_INDEX, 12, 13, 14, IGNORE_INDEX, IGNORE_INDEX]
    assert packed["doc_ids"][0].tolist() == [0] * 5 + [1] * 4 + [2]  # padding: a document of its own
    assert packed["positions"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]
    assert (
        packed["input_ids"][2].tolist() == [*range(31, 39), 41, 42]
        and packed["doc_ids"][2].tolist() == [0] * 8 + [1] * 2
    )
    assert packed["input_ids"][3].tolist() == list(range(51, 61)) and packed["doc_ids"][3].tolist() == [0] * 10
    alone = ChatCollator(pad_id=0, max_length=10, pack=False)(conversations)
    assert alone["input_ids"].shape == (6, 10)  # one conversation per row, padded to the longest
    # the same labels are trained on, packed or not
    assert sorted(packed["labels"][packed["labels"] != IGNORE_INDEX].tolist()) == sorted(
        alone["labels"][alone["labels"] != IGNORE_INDEX].tolist()
    )


def test_packed_log_probs_equal_each_conversation_alone(tokenizer, tmp_path):
    records = [
        user_assistant(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.\n#### {a + b}")
        for a, b in [(3, 4), (12, 30), (7, 7), (100, 1)]
    ]
    records.append({"messages": CONVERSATION})
    data = chat_data(
        [write_records(tmp_path / "chat.jsonl", records)], tokenizer, max_length=192, batch_size=8, shuffle=False
    )
    model = tiny_model(vocab_size=tokenizer.vocab_size, max_seq_len=192)
    conversations = items(data)
    lengths = [len(conversation["ids"]) for conversation in conversations]
    rows = pack_rows(lengths, 192)
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (len(rows), 192)
    with torch.no_grad():
        logits = model(batch["input_ids"], doc_ids=batch["doc_ids"], positions=batch["positions"])
    packed = torch.log_softmax(logits.double(), -1)
    compared = 0
    for row, members in enumerate(rows):
        doc_ids = batch["doc_ids"][row]
        expected_docs = np.repeat(np.arange(len(members)), [lengths[i] for i in members]).tolist()
        assert doc_ids.tolist() == expected_docs + [len(members)] * (192 - sum(lengths[i] for i in members))
        for doc, index in enumerate(members):
            ids, trained = conversations[index]["ids"], conversations[index]["trained"]
            span = (doc_ids == doc).nonzero().flatten()
            assert batch["positions"][row, span].tolist() == list(range(len(ids)))  # positions restart
            assert batch["input_ids"][row, span].tolist() == ids.tolist()
            alone_ids = torch.tensor(ids, dtype=torch.long)[None]
            with torch.no_grad():
                alone = torch.log_softmax(model(alone_ids).double(), -1)[0]
            labels = batch["labels"][row, span]
            mask = labels != IGNORE_INDEX
            assert int(mask.sum()) == int(trained[1:].sum())
            packed_lp = packed[row, span][mask].gather(-1, labels[mask][:, None])
            alone_lp = alone[mask].gather(-1, labels[mask][:, None])
            torch.testing.assert_close(packed_lp, alone_lp, atol=1e-5, rtol=0)
            compared += 1
    assert compared == len(records)
    assert any(len(row) >= 3 for row in rows)  # several conversations really shared a row


# ---------------------------------------------------------------------------------------------- skips and errors


def test_skips_are_counted_by_reason_and_truncation_keeps_what_fits(tokenizer, tmp_path):
    long_question = "word " * 400
    records = [
        user_assistant("Hi?", "Hello."),
        user_assistant(long_question, "Lost to truncation."),  # the reply starts after max_length
        user_assistant("Essay?", "word " * 400),  # cut, but its first reply tokens fit
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "x"}]},
        {"messages": [{"role": "user", "content": "Anyone?"}]},
        {"messages": [{"role": "user", "content": 3}]},
        {"messages": []},
        {"text": "not chat"},
        "{not json",
    ]
    path = write_records(tmp_path / "chat.jsonl", records)
    data = chat_data([path], tokenizer, max_length=64)
    assert data.skipped == {
        "train": {
            TRUNCATED: 1,
            UNKNOWN_ROLE: 1,
            NO_ASSISTANT: 1,
            BAD_MESSAGES: 2,
            MISSING_MESSAGES: 1,
            BAD_JSON: 1,
        }
    }
    entry = data.split_entry("train")
    assert (entry["records"], entry["truncated"]) == (2, 1)
    assert sorted(len(ids) for ids, _ in item_lists(data))[-1] == 64
    assert f"{path}:2: {TRUNCATED}" in entry["skipped_examples"]
    assert entry["skipped_examples"][:2] == [f"{path}:2: {TRUNCATED}", f"{path}:4: {UNKNOWN_ROLE}"]  # file order
    assert "train: 2 records (1 truncated)" in data.summary() and "skipped 7 (" in data.summary()


def test_nothing_trainable_is_a_one_line_error(tokenizer, tmp_path):
    path = write_records(
        tmp_path / "chat.jsonl", [user_assistant("word " * 100, "late"), {"messages": [{"role": "x"}]}]
    )
    with pytest.raises(ValueError) as error:
        chat_data([path], tokenizer, max_length=32)
    message = str(error.value)
    assert "\n" not in message
    assert message == (
        f"no usable chat record in {path} at max_length=32, reasoning_markers=keep "
        f"(skipped: {BAD_MESSAGES}: 1, {TRUNCATED}: 1); check the records, or raise max_length"
    )


def test_refusals_are_one_line_errors(tokenizer, tmp_path):
    good = write_records(tmp_path / "chat.jsonl", [user_assistant("Hi?", "Hello.")])
    cases = [
        (dict(train=[good]), r"^ChatData needs the model's tokenizer for raw records: set data.tokenizer"),
        (dict(train=[good], tokenizer=tokenizer, val=[good], val_fraction=0.1), r"^set either val files or val_"),
        (dict(train=[good], tokenizer=tokenizer, max_length=4096, max_seq_len=512), r"max_length=4096 exceeds the mod"),
        (dict(train=[good], tokenizer=tokenizer, vocab_size=100), r"^the tokenizer has 400 tokens but the model's"),
        (dict(train=["builtin-chat:poems"], tokenizer=tokenizer), r"^unknown builtin-chat:poems: the built-in chat"),
        (dict(train=["builtin-chat:arithmetic?n=3"], tokenizer=tokenizer), r"^unknown option 'n' in builtin-chat:"),
        (
            dict(train=["builtin:prose"], tokenizer=tokenizer),
            r"^builtin:prose holds no chat records; the built-in chat corpora are builtin-chat:",
        ),
        (dict(train=[str(tmp_path / "none*.jsonl")], tokenizer=tokenizer), r"matched no files"),
    ]
    (tmp_path / "notes.txt").write_text("hello")
    cases.append((dict(train=[str(tmp_path / "notes.txt")], tokenizer=tokenizer), r"is a .txt file; chat records need"))
    (tmp_path / "broken.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    cases.append((dict(train=[str(tmp_path / "broken.jsonl.gz")], tokenizer=tokenizer), r"^cannot read .*broken"))
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as error:
            data = ChatData(**{"max_length": 64, **kwargs})
            data.setup("fit")
        assert "\n" not in str(error.value)


def test_jsonl_gz_and_parquet_give_the_same_rows(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [user_assistant(f"Question {i}?", f"Answer {i}.") for i in range(6)] + [{"messages": CONVERSATION}]
    plain = write_records(tmp_path / "a.jsonl", records)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet")
    streams = []
    for path in (plain, str(tmp_path / "a.jsonl.gz"), str(tmp_path / "a.parquet")):
        streams.append(item_lists(chat_data([path], tokenizer, shuffle=False)))
    assert streams[0] == streams[1] == streams[2] and len(streams[0]) == len(records)
    pq.write_table(pa.Table.from_pylist([{"text": "x"}]), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b.parquet has no column 'messages' \(columns: text\); chat records need one"):
        chat_data([str(tmp_path / "b.parquet")], tokenizer)


def test_val_fraction_holds_out_by_content(tokenizer, tmp_path):
    records = [user_assistant(f"Question {i}?", f"Answer {i}.") for i in range(200)]
    forward = chat_data([write_records(tmp_path / "a.jsonl", records)], tokenizer, val_fraction=0.2, shuffle=False)
    backward = chat_data(
        [write_records(tmp_path / "b.jsonl", records[::-1])], tokenizer, val_fraction=0.2, shuffle=False
    )

    def conversations(data, split):
        return {tuple(ids) for ids, _ in item_lists(data, split)}

    assert conversations(forward, "val") == conversations(backward, "val")
    held = forward.split_entry("val")["records"]
    assert 20 <= held <= 60 and held + forward.split_entry("train")["records"] == 200
    assert not conversations(forward, "val") & conversations(forward, "train")
    assert len(chat_data([str(tmp_path / "a.jsonl")], tokenizer).val_dataloader()) == 0  # no val, no validation


# ------------------------------------------------------------------------------------------- epochs and processes


def with_indices(data) -> None:
    """Make the datamodule's loaders also return each batch's record indices (the collator drops `index`)."""
    collate = data.collate()
    data.collate = lambda: lambda batch: (collate(batch), [int(item["index"]) for item in batch])


def epochs_in_one_process(rank: int, rendezvous: str, out: str, datamodule: type, settings: dict, tokenizer: str):
    """One of two gloo processes: two epochs of the training loader, then the first epoch of a fresh datamodule
    with the same settings; each batch's record indices and contents go to OUT/<rank>.json."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    epochs = []
    try:
        for epochs_run in (2, 1):
            data = datamodule(tokenizer=SentencePieceTokenizer(tokenizer), **settings)
            data.setup("fit")
            with_indices(data)
            loader = data.train_dataloader()
            for _ in range(epochs_run):
                epochs.append(
                    [
                        {"index": indices, **{k: v.tolist() if torch.is_tensor(v) else v for k, v in batch.items()}}
                        for batch, indices in loader
                    ]
                )
    finally:
        dist.destroy_process_group()
    (Path(out) / f"{rank}.json").write_text(json.dumps(epochs))


def two_processes(tmp_path, datamodule: type, settings: dict, tokenizer) -> list[list[list[dict]]]:
    """Per process (rank 0, 1), per epoch (0, 1, then a fresh run's 0), its batches (see epochs_in_one_process)."""
    rendezvous = f"file://{tmp_path / 'rendezvous'}"
    (tmp_path / "epochs").mkdir()
    args = (rendezvous, str(tmp_path / "epochs"), datamodule, settings, str(tokenizer.path))
    torch.multiprocessing.start_processes(epochs_in_one_process, args=args, nprocs=2, start_method="spawn")
    return [json.loads((tmp_path / "epochs" / f"{rank}.json").read_text()) for rank in (0, 1)]


def order(batches: list[dict]) -> list[int]:
    return [index for batch in batches for index in batch["index"]]


@pytest.mark.distributed
def test_two_processes_split_every_epoch_s_rows(tokenizer, tmp_path):
    """Under DDP the training loader is litdata's StreamingDataLoader, which splits the records between the
    processes by itself (it reads the process group): each sees as many batches, together every record once, in a
    new order each epoch drawn from (seed, epoch)."""
    settings = dict(train=["builtin-chat:arithmetic?count=120"], max_length=256, batch_size=3, pack=False, seed=11)
    data = ChatData(tokenizer=tokenizer, **settings)
    data.setup("fit")  # prepared once here, into the cache the two processes read
    conversations = item_lists(data)
    records = len(conversations)
    # 2 processes x 3 records divide 120: under DDP litdata drops the remainder of a count they do not divide
    assert records == 120
    with_indices(data)
    assert sorted(order({"index": i} for _, i in data.train_dataloader())) == list(range(records))  # one process
    ranks = two_processes(tmp_path, ChatData, settings, tokenizer)
    for epoch in (0, 1, 2):
        batches = [ranks[rank][epoch] for rank in (0, 1)]
        assert len(batches[0]) == len(batches[1]) == records // (2 * 3)
        assert all(len(batch["index"]) == 3 for rank in batches for batch in rank)
        assert sorted(order(batches[0]) + order(batches[1])) == list(range(records))  # every record, by one, once
        for batch in batches[0] + batches[1]:
            for row, index in zip(batch["input_ids"], batch["index"], strict=True):
                ids, _ = conversations[index]
                assert row == ids + [tokenizer.pad_id] * (len(row) - len(ids))  # `index` is the record's position
    for rank in (0, 1):
        assert order(ranks[rank][1]) != order(ranks[rank][0])  # a new order each epoch ...
        assert order(ranks[rank][2]) == order(ranks[rank][0])  # ... drawn from (seed, epoch): a new run repeats it


# ------------------------------------------------------------------------------------------------ builtin corpus


def solve(question: str) -> int:
    """Each template's answer, worked out from the question text alone."""
    patterns = [
        (
            r"has (\d+) \w+\. \w+ buys (\d+) packs with (\d+) \w+ in each pack, then gives (\d+)",
            lambda have, packs, each, given: have + packs * each - given,
        ),
        (
            r"buys (\d+) \w+ that cost \$(\d+) each and pays with a \$(\d+) bill",
            lambda n, price, bill: bill - n * price,
        ),
        (r"reads (\d+) pages on Monday .* reads (\d+) pages fewer", lambda monday, fewer: 5 * monday - fewer),
        (
            r"saves \$(\d+) every week for (\d+) weeks, then spends \$(\d+)",
            lambda weekly, weeks, spent: weekly * weeks - spent,
        ),
        (
            r"bakes (\d+) trays .* with (\d+) muffins on each tray\. It sells (\d+) .* and (\d+) in",
            lambda trays, each, morning, afternoon: trays * each - morning - afternoon,
        ),
        (
            r"plants (\d+) rows .* with (\d+) trees in each row\. (\d+) trees .* gives (\d+) apples",
            lambda rows, each, died, fruit: (rows * each - died) * fruit,
        ),
    ]
    for pattern, answer in patterns:
        found = re.search(pattern, question)
        if found:
            return answer(*map(int, found.groups()))
    raise AssertionError(f"no template matches {question!r}")


EQUATION = re.compile(r"(\d+) ([-+*]) (\d+) = \$?(\d+)")


def wrong_lines(solution: str) -> int:
    """Lines whose arithmetic is false."""
    lines = [EQUATION.search(line) for line in solution.split("\n")[:-1]]
    assert all(lines), solution
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}
    return sum(ops[m[2]](int(m[1]), int(m[3])) != int(m[4]) for m in lines)


def test_arithmetic_solutions_are_right_and_wrong_solutions_are_wrong():
    answers = []
    for seed in range(300):
        question, solution, answer = arithmetic_problem(seed)
        assert solve(question) == answer >= 0
        assert solution.endswith(f"\n#### {answer}") and wrong_lines(solution) == 0
        wrong, wrong_answer = wrong_solution(seed)
        assert wrong_answer != answer and wrong_answer >= 0 and wrong.endswith(f"\n#### {wrong_answer}")
        assert wrong_lines(wrong) == 1  # exactly one slip, carried through the later steps
        assert arithmetic_problem(seed) == (question, solution, answer) and wrong_solution(seed) == (
            wrong,
            wrong_answer,
        )
        answers.append(answer)
    assert len(set(answers)) > 100


def test_builtin_chat_corpus_is_deterministic_and_well_formed(tokenizer, tmp_path):
    pydoc = list(chat_records("pydoc", None, seed=0))
    assert pydoc == list(chat_records("pydoc", None, seed=0)) and len(pydoc) == len(pydoc_sections()) > 150
    assert pydoc != list(chat_records("pydoc", None, seed=1))  # the seed varies the phrasing ...
    first_answers = [r["messages"][-1 if len(r["messages"]) < 4 else -3]["content"] for r in pydoc]
    assert first_answers == [trimmed(section.body) for section in pydoc_sections()]  # ... not the answers
    assert all(0 < len(answer) <= 1500 or "\n\n" not in answer for answer in first_answers)
    assert any(r["messages"][0]["role"] == "system" for r in pydoc) and any(len(r["messages"]) > 3 for r in pydoc)
    arithmetic = list(chat_records("arithmetic", 50, seed=3))
    assert arithmetic == list(chat_records("arithmetic", 50, seed=3)) and len(arithmetic) == 50
    assert arithmetic[7]["messages"][1]["content"] == arithmetic_problem((3 << 32) + 7)[1]
    assert list(chat_records("pydoc", 5)) == pydoc[:5]
    path = write_jsonl(arithmetic, tmp_path / "out" / "arithmetic.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == arithmetic
    assert sorted(p.name for p in path.parent.iterdir()) == ["arithmetic.jsonl"]
    from_file = item_lists(chat_data([str(path)], tokenizer, shuffle=False))
    from_spec = item_lists(chat_data(["builtin-chat:arithmetic?count=50&seed=3"], tokenizer, shuffle=False))
    assert from_file == from_spec and len(from_spec) == 50


def test_an_edited_builtin_generator_gets_a_new_first_use_cache_folder(tokenizer, tmp_path, monkeypatch):
    """First-use records of a built-in corpus are keyed by the source of the code that generates them: after an
    edit (here: builtin_chat.py read from an edited copy) the cache folder differs, so stale records are never
    reused."""
    from moxin_lightning.data import builtin_chat
    from moxin_lightning.datamodules import records

    data = ChatData(["builtin-chat:arithmetic?count=5"], tokenizer=tokenizer, max_length=256)
    before = data._folder_for(data.train_files, 0.0, "train")
    assert before == data._folder_for(data.train_files, 0.0, "train")  # the same code, the same folder
    edited = tmp_path / "builtin_chat.py"
    edited.write_bytes(Path(builtin_chat.__file__).read_bytes() + b"\n# an edit\n")
    monkeypatch.setattr(builtin_chat, "__file__", str(edited))
    records._builtin_generators_digest.cache_clear()
    after = data._folder_for(data.train_files, 0.0, "train")
    monkeypatch.undo()
    records._builtin_generators_digest.cache_clear()
    assert after != before


# --------------------------------------------------------------------------------- prepare --format chat, refusals


def held_out_by_rule(key, fraction: float, seed: int = 0) -> bool:
    """The split rule the manifest states (records.RECORD_SPLIT_RULE), written out again."""
    text = "\x1e".join(f"{turn['role']}\x1f{turn['content']}" for turn in key).encode()
    return int.from_bytes(hashlib.sha256(f"{seed}\n".encode() + text).digest()[:8], "big") / 2**64 < fraction


def command(tmp_path, *words: str) -> subprocess.CompletedProcess:
    """`python -m moxin_lightning WORDS...` in a fresh working folder, home and cache."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "moxin_lightning", *words],
        cwd=work,
        env=fresh_environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_prepare_format_chat_on_the_command_line_counts_everything_and_chat_data_reads_it_as_raw_files(
    tokenizer, tmp_path
):
    good = [user_assistant(f"Question {i}?", f"Answer {i}.") for i in range(12)]
    good += [user_assistant(f"Essay {i}?", "word " * 80) for i in range(3)]  # cut at max_length, replies kept
    good += [{"messages": CONVERSATION}]  # also cut at 64 tokens, within its first reply
    good += [user_assistant("word " * 80, "late")]  # its reply is cut off: skipped
    bad = [
        ({"messages": [{"role": "tool", "content": "x"}]}, UNKNOWN_ROLE),
        ({"messages": [{"role": "user", "content": "Anyone?"}]}, NO_ASSISTANT),
        ({"messages": []}, BAD_MESSAGES),
        ({"text": "no chat"}, MISSING_MESSAGES),
        ("{not json", BAD_JSON),
    ]
    path = write_records(tmp_path / "chat.jsonl", [*good[:7], *(record for record, _ in bad), *good[7:]])
    out = tmp_path / "prepared"
    result = command(
        tmp_path,
        *("prepare", "--format", "chat", "--input", path, "--tokenizer", str(tokenizer.path), "--output", str(out)),
        *("--max_length", "64", "--val_fraction", "0.3", "--num_workers", "1"),
    )
    assert result.returncode == 0, result.stderr

    expected = {split: dict(records=0, tokens=0, trained_tokens=0, truncated=0, skipped=Counter()) for split in "tv"}
    for record in good:
        counts = expected["v" if held_out_by_rule(record["messages"], 0.3) else "t"]
        ids, trained = TuluTemplate().encode(tokenizer, record["messages"])
        if not any(trained[1:64]):
            counts["skipped"][TRUNCATED] += 1
            continue
        counts["records"] += 1
        counts["tokens"] += min(len(ids), 64)
        counts["trained_tokens"] += sum(trained[1:64])
        counts["truncated"] += len(ids) > 64
    expected["t"]["skipped"].update(reason for _, reason in bad)  # unusable before any split: counted with train
    expected = {"train": expected["t"], "val": expected["v"]}
    assert expected["val"]["records"] > 0 and expected["train"]["truncated"] + expected["val"]["truncated"] == 4

    manifest = read_manifest(out)
    assert manifest["records"] == {
        "format": "chat",
        "format_version": 1,
        "template": {"name": "tulu", "fingerprint": template_fingerprint(TuluTemplate())},
        "max_length": 64,
        "reasoning_markers": "keep",
    }
    for split, counts in expected.items():
        entry = manifest["splits"][split]
        assert {key: entry[key] for key in counts} == {**counts, "skipped": dict(counts["skipped"])}, split
    skipped = expected["train"]["skipped"] + expected["val"]["skipped"]
    assert manifest["skipped"] == dict(skipped) and sum(skipped.values()) == 6
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert result.stdout.splitlines() == [
        f"prepared {out}: train {train['records']} records / {train['tokens']} tokens, "
        f"val {val['records']} records / {val['tokens']} tokens; fingerprint {manifest['fingerprint']}",
        "skipped 6 records: " + ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items())),
    ]

    # one encoder: ChatData on the prepared folder and on the raw file (prepared on first use) give the same batches
    prepared = ChatData([str(out)], max_length=64, batch_size=3, shuffle=False)  # the folder's own tokenizer
    raw = ChatData([path], tokenizer=tokenizer, max_length=64, batch_size=3, shuffle=False, val_fraction=0.3)
    for data in (prepared, raw):
        data.setup("fit")
    assert prepared.tokenizer.fingerprint == tokenizer.fingerprint
    assert raw.datasets != prepared.datasets
    for split, entry in manifest["splits"].items():  # the same items (sha256) and counts; chunks follow the workers
        assert {k: v for k, v in raw.manifests[0]["splits"][split].items() if k not in ("chunks", "chunk_sha256")} == {
            k: v for k, v in entry.items() if k not in ("chunks", "chunk_sha256")
        }
    for loader in ("train_dataloader", "val_dataloader"):
        ours, theirs = list(getattr(prepared, loader)()), list(getattr(raw, loader)())
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs, strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), loader


@pytest.fixture(scope="module")
def prepared_chat(tokenizer, tmp_path_factory) -> str:
    """A folder `prepare --format chat` wrote at max_length 64 with the module's tokenizer and Tülu's template."""
    folder = tmp_path_factory.mktemp("prepared")
    path = write_records(folder / "chat.jsonl", [user_assistant(f"Question {i}?", f"Answer {i}.") for i in range(8)])
    prepare([path], tokenizer, folder / "chat", format="chat", max_length=64, val_fraction=0.0, num_workers=1)
    return str(folder / "chat")


def test_a_prepared_folder_that_does_not_fit_the_run_is_refused_by_setup(tokenizer, prepared_chat, tmp_path):
    texts = [section.body for section in pydoc_sections()[:60]]
    other = SentencePieceTokenizer(train_tokenizer(iter(texts), 500, tmp_path / "other", progress=False, minloglevel=2))
    pairs, documents = tmp_path / "pairs", tmp_path / "documents"
    prepare(
        ["builtin-pairs:arithmetic?count=6"], tokenizer, pairs, format="preference", val_fraction=0.0, num_workers=1
    )
    texts_file = write_records(tmp_path / "docs.jsonl", [{"text": f"Document {i}."} for i in range(5)])
    prepare([texts_file], tokenizer, documents, val_fraction=0.0, num_workers=1)  # format: documents (pretraining)
    tulu, spaced = template_fingerprint(TuluTemplate())[:12], template_fingerprint(SpacedTulu())[:12]
    cases = [
        (
            dict(train=[prepared_chat], tokenizer=other),
            f"{prepared_chat} was prepared with tokenizer {tokenizer.fingerprint[:12]} but data.tokenizer is "
            f"{other.fingerprint[:12]}; prepare it again with this tokenizer, or drop data.tokenizer",
        ),
        (
            dict(train=[prepared_chat], template=SpacedTulu()),
            f"{prepared_chat} was prepared with chat template 'tulu' (fingerprint {tulu}), not this run's 'tulu' "
            f"({spaced}); prepare it again with --template",
        ),
        (
            dict(train=[prepared_chat], max_length=128),
            f"max_length=128 is above the 64 {prepared_chat} was prepared with: its records were cut or skipped at "
            "64; prepare it again with --max_length 128, or set max_length=64",
        ),
        (
            dict(train=[prepared_chat], max_length=32),
            f"max_length=32 differs from the 64 {prepared_chat} was prepared with; prepare it again with "
            "--max_length 32, or set max_length=64",
        ),
        (
            dict(train=[str(pairs)]),
            f"{pairs} holds preference data; ChatData reads prepare --format chat folders",
        ),
        (
            dict(train=[str(documents)]),
            f"{documents} holds documents (layout documents) data; ChatData reads prepare --format chat folders",
        ),
    ]
    for kwargs, expected in cases:
        data = ChatData(**{"batch_size": 2, **kwargs})
        with pytest.raises(ValueError) as error:
            data.setup("fit")
        assert str(error.value) == expected
        assert data.streams == {}  # refused before anything is streamed
    fits = ChatData([prepared_chat], batch_size=2)  # tokenizer and max_length from the folder
    fits.setup("fit")
    assert fits.max_length == 64 and fits.count() == 8


def test_fit_on_the_command_line_refuses_a_prepared_folder_with_one_error_line(prepared_chat, tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"""\
model:
  class_path: moxin_lightning.tasks.SFT
  init_args:
    preset: moxin-tiny-9m
    model_overrides: {{vocab_size: 512, dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1, head_dim: 16, ffn_dim: 64}}
data:
  class_path: moxin_lightning.datamodules.ChatData
  init_args:
    train: [{prepared_chat}]
    max_length: 128
    batch_size: 2
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  default_root_dir: {tmp_path / "run"}
"""
    )
    result = command(tmp_path, "fit", "--config", str(config))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    expected = (
        f"error: max_length=128 is above the 64 {prepared_chat} was prepared with: its records were cut or skipped "
        "at 64; prepare it again with --max_length 128, or set max_length=64"
    )
    assert result.stderr.strip().splitlines()[-1] == expected
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [expected]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.ckpt"))


# ------------------------------------------------------------------------------------------------ resuming


def test_a_run_resumed_mid_epoch_continues_the_epoch_where_it_stopped(tokenizer, tmp_path):
    """Raw records (prepared on first use): checkpoint at step 3 of the first epoch, resume: the batches of the rest
    of that epoch and of the next are those of the uninterrupted run, and so are the final weights."""
    from tests.test_instruct_resume import assert_resumes_exactly

    def data() -> ChatData:
        return chat_data(["builtin-chat:arithmetic?count=40"], tokenizer, max_length=256, batch_size=2)

    per_epoch = len(data().train_dataloader())
    assert per_epoch >= 5
    assert_resumes_exactly(data, per_epoch, tmp_path)
