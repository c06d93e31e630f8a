"""PreferenceData: DPO pairs -> (chosen, rejected) sequences with labels on response tokens only.

A byte tokenizer (id = byte + 3) and a small stand-in template make every expected id computable by hand; the
default Tülu template is checked on the properties that matter (shared prompt, response-only labels). Raw record
files are prepared on first use (`prepare --format preference`'s code, litdata workers included) into a cache
under each test's own `$MOXIN_CACHE`, and streamed back with litdata.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from litdata.utilities.env import _DistributedEnv

from moxin_lightning.data import read_manifest
from moxin_lightning.data.builtin_chat import arithmetic_problem, wrong_solution
from moxin_lightning.data.preference_records import (
    MALFORMED,
    MISSING_RESPONSES,
    NO_PROMPT,
    NO_RESPONSE_TOKEN,
    NOT_ASSISTANT,
    UNKNOWN_ROLE,
)
from moxin_lightning.data.prepare import prepare
from moxin_lightning.data.sources import BAD_JSON, NOT_AN_OBJECT
from moxin_lightning.datamodules.preference import PreferenceData, pair_sequences
from moxin_lightning.datamodules.records import IndexedDataset, Positions
from moxin_lightning.tokenizers.chat import TULU

BOS, EOS, PAD = 1, 2, -1  # no pad piece: padding falls back to EOS
KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "pair_index")


class ByteTokenizer:
    """id = UTF-8 byte + 3; BOS 1, EOS 2, no pad id."""

    vocab_size, bos_id, eos_id, pad_id, fingerprint = 259, BOS, EOS, PAD, "bytes"

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return [BOS] * bos + [byte + 3 for byte in text.encode()] + [EOS] * eos

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode()

    def save(self, directory: str | Path) -> None:
        pass


def b(text: str) -> list[int]:
    return [byte + 3 for byte in text.encode()]


class MiniTemplate:
    """BOS, then per turn '<role initial>:' and the content, an assistant's followed by EOS (trained: its
    content and EOS). `generation_header=False` leaves the 'a:' header out of the generation prompt, so a reply
    starts with two untrained tokens (what makes a truncated pair lose every response label)."""

    def __init__(self, generation_header: bool = True) -> None:
        self.generation_header = generation_header
        self.name = "mini" if generation_header else "mini-bare"

    def encode(self, tokenizer, messages, *, add_generation_prompt=False):
        ids, trained = [BOS], [False]
        for message in messages:
            head = b(message["role"][0] + ":")
            if message["role"] == "assistant" and self.generation_header and ids[-len(head) :] == head:
                head = []  # the generation prompt already wrote it
            body = b(message["content"]) + ([EOS] if message["role"] == "assistant" else [])
            ids += head + body
            trained += [False] * len(head) + [message["role"] == "assistant"] * len(body)
        if add_generation_prompt and self.generation_header:
            ids, trained = ids + b("a:"), trained + [False, False]
        return ids, trained


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Raw records are prepared on first use into $MOXIN_CACHE/records: each test gets its own."""
    monkeypatch.setenv("MOXIN_CACHE", str(tmp_path / "cache"))


def write_jsonl(path: Path, records: list) -> Path:
    lines = [record if isinstance(record, str) else json.dumps(record) for record in records]
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def loaded(tmp_path: Path, records: list, name: str = "pairs.jsonl", **kwargs) -> PreferenceData:
    kwargs = {"tokenizer": ByteTokenizer(), "template": MiniTemplate(), "shuffle": False, **kwargs}
    data = PreferenceData([str(write_jsonl(tmp_path / name, records))], **kwargs)
    data.setup()
    return data


def first_batch(data: PreferenceData, split: str = "train") -> dict[str, torch.Tensor]:
    return next(iter(data.ordered_dataloader(split)))


def items(data: PreferenceData, split: str = "train") -> list[dict]:
    """Every pair of a split in index order, as its sequences: {chosen, rejected}_{input_ids, labels}, pair_index."""
    stream = Positions(data.streams[split])
    return [{**pair_sequences(item), "pair_index": item["index"]} for item in stream]


def trimmed(item: dict, key: str) -> list[int]:
    return item[key].tolist()


def test_exact_tensors_of_a_small_pair(tmp_path):
    data = loaded(tmp_path, [{"prompt": "2+2?", "chosen": "4", "rejected": "no"}])
    batch = first_batch(data)
    prompt = [BOS, 120, 61, 53, 46, 53, 66, 100, 61]  # BOS 'u:' '2+2?' 'a:'
    ignore = [-100] * 8
    assert batch["chosen_input_ids"].tolist() == [prompt + [55, EOS, EOS]]  # '4' EOS, padded with EOS
    assert batch["chosen_labels"].tolist() == [ignore + [55, EOS, -100, -100]]
    assert batch["rejected_input_ids"].tolist() == [prompt + [113, 114, EOS]]  # 'no' EOS
    assert batch["rejected_labels"].tolist() == [ignore + [113, 114, EOS, -100]]
    assert batch["pair_index"].tolist() == [0]
    assert {key: batch[key].dtype for key in KEYS} == dict.fromkeys(KEYS, torch.long)


def test_tulu_prompt_is_shared_and_only_the_response_is_labelled(tmp_path):
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},  # context: never trained in DPO
        {"role": "user", "content": "2+2?"},
    ]
    data = loaded(tmp_path, [{"messages": prompt, "chosen": "4", "rejected": "five"}], template=TULU)
    prompt_ids, _ = TULU.encode(ByteTokenizer(), prompt, add_generation_prompt=True)
    batch = first_batch(data)
    start = len(prompt_ids)
    chosen, rejected = batch["chosen_input_ids"][0], batch["rejected_input_ids"][0]
    assert chosen[:start].tolist() == rejected[:start].tolist() == prompt_ids
    assert ByteTokenizer().decode(prompt_ids).endswith("<|user|>\n2+2?\n<|assistant|>\n")
    for side, response in (("chosen", "4"), ("rejected", "five")):
        labels = batch[f"{side}_labels"][0]
        trained = labels[labels != -100].tolist()
        assert trained == b(response) + [EOS]
        assert (labels[: start - 1] == -100).all()  # the prompt's own assistant turn is context
        assert labels[start - 1].item() == b(response)[0]  # the last prompt token predicts the first reply token


def test_left_truncation_keeps_the_bos_and_the_response(tmp_path):
    record = {"prompt": "x" * 50, "chosen": "yes", "rejected": "nope"}
    data = loaded(tmp_path, [record], max_length=20)
    (item,) = items(data)
    kept_prompt = [BOS] + b("x" * 12 + "a:")  # 20 - len('nope' EOS) - BOS = 14 prompt tokens from the right
    assert trimmed(item, "rejected_input_ids") == kept_prompt + b("nope") + [EOS]
    assert trimmed(item, "chosen_input_ids") == kept_prompt + b("yes") + [EOS]
    assert trimmed(item, "chosen_labels") == [-100] * 14 + b("yes") + [EOS, -100]
    assert data.split_entry("train")["truncated"] == 1

    data = loaded(tmp_path, [record], max_length=4)  # no prompt text fits: responses are cut from the right
    (item,) = items(data)
    assert trimmed(item, "chosen_input_ids") == [BOS] + b("yes")
    assert trimmed(item, "rejected_input_ids") == [BOS] + b("nop")
    assert trimmed(item, "rejected_labels") == b("nop") + [-100]
    assert data.skipped == {"train": {}}


def test_right_truncation_cuts_each_whole_sequence_from_the_right(tmp_path):
    record = {"prompt": "x" * 10, "chosen": "yes yes yes", "rejected": "no"}
    data = loaded(tmp_path, [record], max_length=20, truncation="right")
    (item,) = items(data)
    prompt = [BOS] + b("u:" + "x" * 10 + "a:")  # 15 tokens, all kept: only the responses are cut, to 5
    assert trimmed(item, "chosen_input_ids") == prompt + b("yes y")
    assert trimmed(item, "rejected_input_ids") == prompt + b("no") + [EOS]  # short enough: untouched
    assert trimmed(item, "chosen_labels") == [-100] * 14 + b("yes y") + [-100]
    assert data.split_entry("train")["truncated"] == 1
    assert read_manifest(data._plan()["train"][0])["records"]["truncation"] == "right"

    # A prompt of max_length tokens or more leaves no response token: the pair is skipped (prompt_first keeps it).
    records = [{**record, "prompt": "x" * 30}, record]
    data = loaded(tmp_path, records, max_length=20, truncation="right")
    assert data.skipped == {"train": {NO_RESPONSE_TOKEN: 1}} and len(items(data)) == 1
    assert len(items(loaded(tmp_path, records, max_length=20))) == 2


def test_a_folder_prepared_with_another_truncation_is_refused_in_one_line(tmp_path):
    records = [{"prompt": "q", "chosen": "a", "rejected": "b"}]
    folder = prepare(
        [str(write_jsonl(tmp_path / "p.jsonl", records))], ByteTokenizer(), tmp_path / "prepared", num_workers=1,
        val_fraction=0.0, format="preference", template=MiniTemplate(), max_length=32, truncation="right",
    )  # fmt: skip
    assert PreferenceData([str(folder)], tokenizer=ByteTokenizer(), template=MiniTemplate()).truncation == "right"
    with pytest.raises(ValueError, match=r"^truncation='prompt_first' differs from the 'right' .* was prepared with; "):
        PreferenceData(
            [str(folder)], tokenizer=ByteTokenizer(), template=MiniTemplate(), truncation="prompt_first"
        ).setup()


def test_unusable_records_are_skipped_and_counted(tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    records = [
        good,
        "{not json",
        "[1, 2]",
        {"prompt": "q", "chosen": "a"},
        {"chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": 3, "rejected": "b"},
        {"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
        good,
    ]
    data = loaded(tmp_path, records)
    assert data.pair_count() == 2
    assert data.skipped["train"] == {
        BAD_JSON: 1,
        NOT_AN_OBJECT: 1,
        MISSING_RESPONSES: 1,
        NO_PROMPT: 1,
        MALFORMED: 1,
        UNKNOWN_ROLE: 1,
        NOT_ASSISTANT: 1,
    }
    assert data.split_entry("train")["skipped_examples"][0] == f"{tmp_path / 'pairs.jsonl'}:2: {BAD_JSON}"
    listed = ", ".join(f"{reason}: 1" for reason in sorted(data.skipped["train"]))
    # two pairs of BOS 'u:q' 'a:' (6 tokens, in both sequences) and 'a' / 'b' + EOS (2 trained tokens each)
    assert data.summary() == (
        f"PreferenceData (mini template) train: 2 records (0 truncated), 32 tokens (8 trained); skipped 7 ({listed})"
    )


def test_a_pair_without_response_labels_is_skipped_and_none_left_is_a_one_line_error(tmp_path):
    bare = MiniTemplate(generation_header=False)  # a reply starts with its untrained 'a:' header
    records = [{"prompt": "q" * 30, "chosen": "yes", "rejected": "no"}, {"prompt": "q", "chosen": "y", "rejected": "n"}]
    data = loaded(tmp_path, records, template=bare, max_length=4)  # BOS 'a:' and one reply token
    kept = items(data)
    assert [trimmed(kept[i], "chosen_input_ids") for i in (0, 1)] == [[BOS, *b("a:y")]] * 2
    assert trimmed(kept[0], "rejected_labels") == [-100, -100, *b("n"), -100]
    assert data.split_entry("train")["truncated"] == 2
    with pytest.raises(ValueError) as error:
        loaded(tmp_path, records, template=bare, max_length=3)  # BOS 'a:': no reply token left in either pair
    message = str(error.value)
    assert "\n" not in message
    assert message == (
        f"no usable preference record in {tmp_path / 'pairs.jsonl'} at max_length=3, truncation=prompt_first "
        f"(skipped: {NO_RESPONSE_TOKEN}: 2); check the records, or raise max_length"
    )


@pytest.mark.parametrize("template", [MiniTemplate(), TULU], ids=["mini", "tulu"])
def test_record_conventions_give_the_same_tensors(tmp_path, template):
    user = {"role": "user", "content": "Hi"}
    a, b_ = {"role": "assistant", "content": "A"}, {"role": "assistant", "content": "B"}
    records = [
        {"prompt": "Hi", "chosen": "A", "rejected": "B"},
        {"messages": [user], "chosen": "A", "rejected": "B"},
        {"messages": [user], "chosen": [a], "rejected": [b_]},
        {"prompt": [user], "chosen": [a], "rejected": [b_]},  # TRL conversational
        {"prompt": [user], "chosen": [user, a], "rejected": [user, b_]},  # responses repeat the prompt
        {"prompt": "Hi", "chosen": [user, a], "rejected": [user, b_]},  # UltraFeedback: the prompt is extracted
        {"chosen": [user, a], "rejected": [user, b_]},  # TRL implicit prompt
        {"prompt": [{**user, "name": "x"}], "chosen": [{**a, "extra": 1}], "rejected": [b_]},  # extra keys ignored
    ]
    data = loaded(tmp_path, records, template=template)
    made = items(data)
    assert len(made) == len(records)
    for item in made[1:]:
        for key in KEYS[:4]:
            assert item[key].tolist() == made[0][key].tolist(), key
    # the same records from a compressed jsonl and a parquet file
    write_jsonl(tmp_path / "more.jsonl.gz", records[:1])
    pq.write_table(pa.Table.from_pylist([records[5]]), tmp_path / "more.parquet")
    files = [str(tmp_path / "more.jsonl.gz"), str(tmp_path / "more.parquet")]
    other = PreferenceData(files, tokenizer=ByteTokenizer(), template=template)
    other.setup()
    assert other.pair_count() == 2
    for item in items(other):
        for key in KEYS[:4]:
            assert item[key].tolist() == made[0][key].tolist(), key


def pairs(count: int) -> list[dict]:
    return [
        {"prompt": f"question {i}", "chosen": f"right {i}" * (i % 3 + 1), "rejected": f"no {i}"} for i in range(count)
    ]


def test_pair_index_is_stable_across_shuffles_and_processes(tmp_path):
    """pair_index is the pair's position in its split: a batch row holds that pair's tensors whatever the epoch's
    order, the seed, or the process litdata hands the pair to."""
    data = loaded(tmp_path, pairs(10), shuffle=True, batch_size=3)
    by_index = items(data)
    assert [item["pair_index"] for item in by_index] == list(range(10))

    def check_rows(batch: dict[str, torch.Tensor]) -> list[int]:
        for row, index in enumerate(batch["pair_index"].tolist()):
            item = by_index[index]
            for key in KEYS[:4]:
                width = len(item[key])
                assert batch[key][row, :width].tolist() == item[key].tolist()
                filler = -100 if key.endswith("labels") else EOS
                assert (batch[key][row, width:] == filler).all()
        return batch["pair_index"].tolist()

    loader = data.train_dataloader()
    orders = []
    for _epoch in (1, 2):  # each pass over the loader is the next epoch, reshuffled from (seed, epoch)
        order = [index for batch in loader for index in check_rows(batch)]
        assert sorted(order) == list(range(10))
        orders.append(order)
    assert orders[0] != orders[1] != list(range(10))
    assert orders[0] != list(range(10))
    assert [i for batch in data.train_dataloader() for i in check_rows(batch)] == orders[0]  # epoch 1 again
    again = loaded(tmp_path, pairs(10), shuffle=True, batch_size=3, seed=7)
    assert [item["chosen_input_ids"].tolist() for item in items(again)] == [
        item["chosen_input_ids"].tolist() for item in by_index
    ]
    # two processes: litdata gives each a share of the split; an item's index is still its position in the split
    folder = str(Path(data.datasets[0]) / "train")
    shares = []
    for rank in (0, 1):
        stream = IndexedDataset(folder, shuffle=True, seed=data.seed, drop_last=True)
        stream.distributed_env = _DistributedEnv(world_size=2, global_rank=rank, num_nodes=1)  # as in process rank
        share = []
        for item in stream:
            for key, value in pair_sequences(item).items():
                assert value.tolist() == by_index[item["index"]][key].tolist()
            share.append(item["index"])
        shares.append(share)
    assert len(shares[0]) == len(shares[1]) == 5
    assert sorted(shares[0] + shares[1]) == list(range(10))


def test_fingerprint_follows_data_template_and_max_length_not_batching(tmp_path):
    base = loaded(tmp_path, pairs(6)).fingerprint
    assert len(base) == 64
    assert loaded(tmp_path, pairs(6), batch_size=2, shuffle=True, seed=3, num_workers=1).fingerprint == base
    assert loaded(tmp_path, pairs(6), max_length=4096).fingerprint != base
    assert loaded(tmp_path, pairs(6), template=TULU).fingerprint != base
    changed = pairs(6)
    changed[4]["rejected"] = "no 5"
    assert loaded(tmp_path, changed).fingerprint != base
    assert loaded(tmp_path, pairs(6)[::-1]).fingerprint != base  # pair_index order is part of it
    # it is the prepared folder's: `prepare --format preference` of the same records, from another file and into
    # any folder, gives it too (the raw records above were prepared on first use through the same code)
    source = write_jsonl(tmp_path / "elsewhere.jsonl", pairs(6))
    options = dict(format="preference", template=MiniTemplate(), max_length=2048, val_fraction=0, num_workers=1)
    folder = prepare([str(source)], ByteTokenizer(), tmp_path / "prepared", **options)
    assert read_manifest(folder)["records"]["max_length"] == 2048
    moved = folder.rename(tmp_path / "moved")
    prepared = PreferenceData([str(moved)], tokenizer=ByteTokenizer(), template=MiniTemplate(), batch_size=5)
    assert prepared.fingerprint == base
    prepared.setup()
    assert prepared.max_length == 2048 and prepared.pair_count() == 6


def test_validation_from_files_or_a_held_out_share(tmp_path):
    data = loaded(tmp_path, pairs(40) + pairs(40), val_fraction=0.25)
    train, val = items(data, "train"), items(data, "val")
    assert len(train) + len(val) == 80 and 0 < len(val) < 40

    def prompts(dataset):
        return [ByteTokenizer().decode(item["chosen_input_ids"].tolist()).split("a:")[0] for item in dataset]

    assert sorted(prompts(train) + prompts(val)) == sorted([f"u:question {i}" for i in range(40)] * 2)
    assert not set(prompts(train)) & set(prompts(val))  # both pairs of a prompt land on the same side
    assert data.split_fingerprint("val") != data.fingerprint
    write_jsonl(tmp_path / "val.jsonl", pairs(3))
    data = loaded(tmp_path, pairs(5), val=[str(tmp_path / "val.jsonl")], batch_size=2, pad_to_max_length=True)
    batches = list(data.val_dataloader())
    assert [batch["pair_index"].tolist() for batch in batches] == [[0, 1], [2]]
    assert batches[0]["chosen_input_ids"].shape == (2, 2048)
    assert len(loaded(tmp_path, pairs(2)).val_dataloader()) == 0


def test_configuration_errors_are_one_line(tmp_path):
    records = [{"prompt": "q", "chosen": "a", "rejected": "b"}]
    cases = [
        (dict(max_seq_len=1024), "max_length=2048 exceeds the model's max_seq_len=1024; lower max_length"),
        (dict(vocab_size=100), "the tokenizer has 259 tokens but the model's vocab_size is 100"),
        (dict(val_fraction=0.5, val=["x"]), "set either val files or val_fraction=0.5, not both"),
        (dict(tokenizer=None), "PreferenceData needs the model's tokenizer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            loaded(tmp_path, records, **kwargs)
    wrong_corpus = "builtin-chat:arithmetic holds no preference records; the built-in preference corpora are "
    wrong_corpus += "builtin-pairs:"
    with pytest.raises(ValueError, match=wrong_corpus):
        PreferenceData(["builtin-chat:arithmetic"], tokenizer=ByteTokenizer()).setup()

    class NotAPrefix(MiniTemplate):
        def encode(self, tokenizer, messages, *, add_generation_prompt=False):
            ids, trained = super().encode(tokenizer, messages, add_generation_prompt=add_generation_prompt)
            return (ids + [9], trained + [False]) if add_generation_prompt else (ids, trained)

    with pytest.raises(ValueError, match="does not encode a prompt with its generation prompt as the start"):
        loaded(tmp_path, records, template=NotAPrefix())


def test_builtin_arithmetic_pairs_are_deterministic_correct_versus_wrong():
    def make(spec: str) -> PreferenceData:
        data = PreferenceData([spec], tokenizer=ByteTokenizer(), shuffle=False)
        data.setup()
        return data

    data = make("builtin-pairs:arithmetic?count=30")
    assert data.pair_count() == 30
    made = items(data)
    assert make("builtin-pairs:arithmetic?count=30").fingerprint == data.fingerprint
    assert make("builtin-pairs:arithmetic?count=30&seed=1").fingerprint != data.fingerprint
    tokenizer = ByteTokenizer()
    for index in range(30):
        item = made[index]
        question, _, answer = arithmetic_problem(index)
        _, wrong = wrong_solution(index)
        assert wrong != answer
        chosen = [t for t in item["chosen_labels"].tolist() if t != -100]
        rejected = [t for t in item["rejected_labels"].tolist() if t != -100]
        assert chosen[-1] == rejected[-1] == EOS
        assert tokenizer.decode(chosen[:-1]).endswith(f"\n#### {answer}")
        assert tokenizer.decode(rejected[:-1]).endswith(f"\n#### {wrong}")
        assert question in tokenizer.decode(item["chosen_input_ids"].tolist())
    with pytest.raises(ValueError, match="unknown builtin-pairs:pydoc"):
        make("builtin-pairs:pydoc")


def test_ordered_shares_of_several_processes_cover_every_pair_with_equal_batch_counts(tmp_path):
    data = loaded(tmp_path, pairs(7), batch_size=2)
    assert data.pair_count() == 7
    loaders = [data.ordered_dataloader(rank=rank, world_size=3) for rank in range(3)]
    shares = [[i for batch in loader for i in batch["pair_index"].tolist()] for loader in loaders]
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 6, 6]]  # contiguous blocks, padded with the block's last pair
    assert [len(loader) for loader in loaders] == [2, 2, 2]  # as many forwards on every process
    assert sorted(set(sum(shares, []))) == list(range(7))
    assert [i for b in data.ordered_dataloader() for i in b["pair_index"].tolist()] == list(range(7))
    padded = list(loaders[2])[1]  # the repeated pair is the same pair
    assert padded["chosen_input_ids"][0].tolist() == items(data)[6]["chosen_input_ids"].tolist()
