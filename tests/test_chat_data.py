"""Chat data for SFT: the Tülu template, assistant-only labels, packing equal to unpacked, skips and refusals, the
built-in offline chat corpus and the split of the rows between two processes."""

import gzip
import json
import re

import numpy as np
import pytest
import torch

from datamodules.chat import (
    BAD_MESSAGES,
    IGNORE_INDEX,
    MISSING_MESSAGES,
    NO_ASSISTANT,
    TRUNCATED,
    UNKNOWN_ROLE,
    ChatCollator,
    ChatData,
    pack_rows,
)
from moxin_lightning.data.builtin_chat import (
    arithmetic_problem,
    chat_records,
    pydoc_sections,
    trimmed,
    write_jsonl,
    wrong_solution,
)
from moxin_lightning.data.sources import BAD_JSON, DataError
from moxin_lightning.tokenizers import SentencePieceTokenizer, train_tokenizer
from moxin_lightning.tokenizers.chat import TuluTemplate
from tests.prepared_data import write_records

from .conftest import tiny_model

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is a list?"},
    {"role": "assistant", "content": "A mutable sequence."},
    {"role": "user", "content": "And a tuple?"},
    {"role": "assistant", "content": "An immutable one."},
]


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
    assert data.stats["train"].trained_tokens == reply_tokens + len(tokenizer.encode("Seven.")) + 1


def test_collate_refuses_a_batch_without_assistant_tokens():
    row = {name: np.arange(4) for name in ("input_ids", "doc_ids", "positions")}
    row["labels"] = np.full(4, IGNORE_INDEX)
    with pytest.raises(ValueError, match=r"^a chat batch has no assistant token to train on; every row"):
        ChatCollator(pad_id=0)([row])


# ------------------------------------------------------------------------------------------------------ packing


def test_pack_rows_is_greedy_and_keeps_conversations_whole():
    rows = pack_rows(np.array([5, 4, 3, 8, 2, 10]), 10)
    assert [row.tolist() for row in rows] == [[0, 1], [2], [3, 4], [5]]
    assert [row.tolist() for row in pack_rows(np.array([5, 4, 3]), 10, order=np.array([2, 0, 1]))] == [[2, 0], [1]]


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
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (len(data.datasets["train"]), 192)
    with torch.no_grad():
        logits = model(batch["input_ids"], doc_ids=batch["doc_ids"], positions=batch["positions"])
    packed = torch.log_softmax(logits.double(), -1)
    compared = 0
    for row in range(batch["input_ids"].shape[0]):
        doc_ids = batch["doc_ids"][row]
        conversations = data.datasets["train"].rows[row]
        lengths = data.datasets["train"].chats.lengths[conversations]
        expected_docs = np.repeat(np.arange(len(conversations)), lengths).tolist()
        assert doc_ids.tolist() == expected_docs + [len(conversations)] * (192 - int(lengths.sum()))
        for doc, index in enumerate(conversations):
            ids, trained = data.datasets["train"].chats.conversation(int(index))
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
    assert any(len(row) >= 3 for row in data.datasets["train"].rows)  # several conversations really shared a row


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
    data = chat_data([write_records(tmp_path / "chat.jsonl", records)], tokenizer, max_length=64)
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
    stats = data.stats["train"]
    assert (stats.conversations, stats.truncated) == (2, 1)
    assert sorted(data.datasets["train"].chats.lengths.tolist())[-1] == 64
    assert f"{tmp_path / 'chat.jsonl'}:2: {TRUNCATED}" in stats.skipped_examples
    assert "2 conversations (1 truncated)" in data.summary() and "skipped 7 (" in data.summary()


def test_nothing_trainable_is_a_one_line_error(tokenizer, tmp_path):
    path = write_records(
        tmp_path / "chat.jsonl", [user_assistant("word " * 100, "late"), {"messages": [{"role": "x"}]}]
    )
    with pytest.raises(ValueError) as error:
        chat_data([path], tokenizer, max_length=32)
    message = str(error.value)
    assert "\n" not in message
    assert message == (
        f"no trainable conversation in train data ['{path}'] at max_length=32 "
        f"(skipped: {BAD_MESSAGES}: 1, {TRUNCATED}: 1); check the files' messages or raise max_length"
    )


def test_refusals_are_one_line_errors(tokenizer, tmp_path):
    good = write_records(tmp_path / "chat.jsonl", [user_assistant("Hi?", "Hello.")])
    cases = [
        (dict(train=[good]), r"^ChatData needs the model's tokenizer: set data.tokenizer"),
        (dict(train=[good], tokenizer=tokenizer, val=[good], val_fraction=0.1), r"^set either val files or val_"),
        (dict(train=[good], tokenizer=tokenizer, max_length=4096, max_seq_len=512), r"max_length=4096 exceeds the mod"),
        (dict(train=[good], tokenizer=tokenizer, vocab_size=100), r"^the tokenizer has 400 tokens but the model's"),
        (dict(train=["builtin-chat:poems"], tokenizer=tokenizer), r"^unknown builtin-chat:poems: the built-in chat"),
        (dict(train=["builtin-chat:arithmetic?n=3"], tokenizer=tokenizer), r"^unknown option 'n' in builtin-chat:"),
        (dict(train=["builtin:prose"], tokenizer=tokenizer), r"^builtin:prose is plain text for pretraining; the bu"),
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
        chats = chat_data([path], tokenizer, shuffle=False).datasets["train"].chats
        streams.append((chats.tokens.tolist(), chats.trained.tolist(), chats.offsets.tolist()))
    assert streams[0] == streams[1] == streams[2] and len(streams[0][2]) == len(records) + 1
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
        chats = data.datasets[split].chats
        return {tuple(chats.conversation(i)[0].tolist()) for i in range(len(chats))}

    assert conversations(forward, "val") == conversations(backward, "val")
    held = forward.stats["val"].conversations
    assert 20 <= held <= 60 and held + forward.stats["train"].conversations == 200
    assert not conversations(forward, "val") & conversations(forward, "train")
    assert len(chat_data([str(tmp_path / "a.jsonl")], tokenizer).val_dataloader()) == 0  # no val, no validation


# ------------------------------------------------------------------------------------------- epochs and processes


def test_two_processes_split_every_epoch_s_rows(tokenizer):
    """What Lightning does under DDP: wrap the loader's sampler in its distributed sampler, set the epoch."""
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _is_dataloader_shuffled, _update_dataloader

    data = chat_data(["builtin-chat:arithmetic?count=120"], tokenizer, max_length=128, batch_size=3)
    rows = len(data.datasets["train"])
    assert rows >= 20
    loader = data.train_dataloader()
    orders = {}
    for epoch in (0, 1):
        ranks = []
        for rank in (0, 1):
            sampler = _get_distributed_sampler(
                loader, _is_dataloader_shuffled(loader), overfit_batches=0, num_replicas=2, rank=rank
            )
            rank_loader = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
            _set_sampler_epoch(rank_loader, epoch)
            ranks.append(list(rank_loader.sampler))
            first = next(iter(rank_loader))
            expected = data.datasets["train"][ranks[-1][0]]["input_ids"]
            assert first["input_ids"][0, : len(expected)].tolist() == expected.tolist()
        assert len(ranks[0]) == len(ranks[1]) == (rows + 1) // 2
        assert sorted(set(ranks[0] + ranks[1])) == list(range(rows))  # every row, by one of the two ...
        assert len(ranks[0] + ranks[1]) == rows + rows % 2  # ... once (an odd count repeats one row to even out)
        orders[epoch] = ranks
        single = loader.sampler
        single.set_epoch(epoch)
        assert sorted(single) == list(range(rows))
    assert orders[0] != orders[1]  # a new order each epoch ...
    loader.sampler.set_epoch(0)
    assert list(loader.sampler)[::2] == orders[0][0]  # ... drawn from (seed, epoch), the same on every process


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
    from_file = chat_data([str(path)], tokenizer, shuffle=False).datasets["train"].chats
    from_spec = chat_data(["builtin-chat:arithmetic?count=50&seed=3"], tokenizer, shuffle=False).datasets["train"].chats
    assert from_file.tokens.tolist() == from_spec.tokens.tolist() and len(from_spec) == 50


# ------------------------------------------------------------------------------------------------ resuming


def test_a_run_resumed_mid_epoch_continues_the_epoch_where_it_stopped(tokenizer, tmp_path):
    """Checkpoint at step 3 of the first epoch, resume: the batches of the rest of that epoch and of the next are
    those of the uninterrupted run, and so are the final weights."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from moxin_lightning.tasks import SFT

    class Seen(Callback):
        def __init__(self):
            self.batches = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.batches.append(batch["input_ids"].clone())

    per_epoch = len(
        chat_data(["builtin-chat:arithmetic?count=40"], tokenizer, max_length=256, batch_size=2).train_dataloader()
    )
    assert per_epoch >= 5
    steps = per_epoch + 3  # into the second epoch

    def run(ckpt_path=None):
        seen = Seen()
        model = SFT(
            preset="moxin-tiny-9m", lr=1e-3, warmup_steps=1,
            model_overrides=dict(vocab_size=512, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64),
        )  # fmt: skip
        trainer = L.Trainer(
            max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0,
            callbacks=[seen, ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)],
        )  # fmt: skip
        data = chat_data(["builtin-chat:arithmetic?count=40"], tokenizer, max_length=256, batch_size=2)
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
        return seen.batches, model

    uninterrupted, finished = run()
    resumed, again = run(tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    assert len(uninterrupted) == steps and len(resumed) == steps - 3
    assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[3:], strict=True))
    assert not torch.equal(uninterrupted[0], uninterrupted[per_epoch])  # the second epoch is in a new order
    for (name, weight), other in zip(finished.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(weight, other), name
