"""`prepare`'s train/val split on small corpora: at least one item is held out (the one with the smallest split
hash when the hash rule picks none), a corpus the rule already splits keeps exactly its split and manifest, and
what can be refused before the work (a single item, no usable item) is, in one line, with nothing written.

Expectations are computed here from the rules the manifest states (`is_validation`, `split_hash`, `record_hash`)
and from the tokenizer's own encoding, not from what `prepare` reports.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from moxin_lightning.data import DataError, is_validation, read_manifest
from moxin_lightning.data.chat_records import TRUNCATED
from moxin_lightning.data.prepare import prepare
from moxin_lightning.data.worker import AT_LEAST_ONE_RULE, SPLIT_RULE, SplitItem, scan_split
from moxin_lightning.tokenizers import SentencePieceTokenizer
from moxin_lightning.tokenizers.chat import TuluTemplate
from tests.prepared_data import train_tiny_bpe, write_records
from tests.test_chat_data import command

WORDS = "the quick brown fox jumps over a lazy dog while small corpora keep one document for validation".split()
SMALL = [f"small document {i}: the quick brown fox number {i}" for i in range(40)]  # the rule at 0.005 picks none
LARGER = [f"document number {i} says hello" for i in range(400)]  # the rule at 0.005 picks 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(train_tiny_bpe(tmp_path_factory.mktemp("tokenizer"), WORDS))


def split_hash(text: str, seed: int = 0) -> int:
    """The value `SPLIT_RULE` compares for a document, written out again from the rule's text."""
    return int.from_bytes(
        hashlib.blake2b(f"{seed}\n".encode() + text.encode("utf-8"), digest_size=8).digest(), "little"
    )


def record_hash(key: list[dict], seed: int = 0) -> int:
    """The value `RECORD_SPLIT_RULE` compares for a record's turns, written out again from the rule's text."""
    text = "\x1e".join(f"{turn['role']}\x1f{turn['content']}" for turn in key).encode()
    return int.from_bytes(hashlib.sha256(f"{seed}\n".encode() + text).digest()[:8], "big")


def documents_file(path: Path, texts: list[str]) -> str:
    return write_records(path, [{"text": text} for text in texts])


def split_documents(folder: Path) -> list[list[int]]:
    """Every item of a split, through litdata's default reader (one document each)."""
    from litdata import StreamingDataset

    dataset = StreamingDataset(str(folder))
    return [np.asarray(dataset[i]).tolist() for i in range(len(dataset))]


def stream_sha256(tokenizer, texts: list[str]) -> str:
    """The sha256 the manifest gives a split holding `texts`: its int32 little-endian token stream."""
    ids = [token for text in texts for token in tokenizer.encode(text, bos=True, eos=True)]
    return hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).hexdigest()


def user_assistant(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


# ------------------------------------------------------------------------------------------- the pre-pass alone


def test_the_pre_pass_stops_at_the_first_held_item_and_otherwise_finds_the_smallest_hash():
    consumed = []

    def items(values, held):
        for index, (value, is_held) in enumerate(zip(values, held, strict=True)):
            consumed.append(index)
            yield SplitItem(value, is_held, f"file:{index}", payload=value)

    scan = scan_split(items([50, 40, 3, 60, 70], [False, False, True, False, False]), val=True)
    assert (scan.items, scan.complete, scan.held, scan.forced, consumed) == (3, False, True, None, [0, 1, 2])
    consumed.clear()  # a held first item: one more is read, to know there are at least 2
    scan = scan_split(items([3, 50, 60], [True, False, False]), val=True)
    assert (scan.items, scan.complete, scan.forced, consumed) == (2, False, None, [0, 1])
    consumed.clear()
    scan = scan_split(items([50, 40, 45, 90], [False] * 4), val=True)
    assert (scan.items, scan.complete, scan.forced, scan.where, scan.lone) == (4, True, 40, "file:1", False)
    scan = scan_split(items([50], [False]), val=True)
    assert (scan.items, scan.forced, scan.lone) == (1, 50, True)
    consumed.clear()  # no val split: the first item says the inputs are not empty
    assert scan_split(items([50, 40], [False, False]), val=False).items == 1 and consumed == [0]
    assert scan_split(iter(()), val=True).items == 0
    # records: an item that does not survive encoding is neither the held one nor the forced one
    usable = {40: False, 45: True, 50: True, 3: False}
    scan = scan_split(items([50, 3, 40, 45], [False, True, False, False]), val=True, usable=usable.__getitem__)
    assert (scan.held, scan.forced, scan.where) == (False, 45, "file:3")


# ----------------------------------------------------------------------------------------------- documents


def test_a_small_corpus_holds_out_exactly_the_document_with_the_smallest_hash(tmp_path, tokenizer, capfd):
    assert not any(is_validation(text, 0.005) for text in SMALL)  # the hash rule alone would hold out nothing
    path = documents_file(tmp_path / "small.jsonl", SMALL)
    output = tmp_path / "out"
    prepare([path], tokenizer, output, num_workers=1)  # the default val_fraction, 0.005

    smallest = min(range(len(SMALL)), key=lambda i: split_hash(SMALL[i]))
    train = [text for i, text in enumerate(SMALL) if i != smallest]
    assert split_documents(output / "val") == [tokenizer.encode(SMALL[smallest], bos=True, eos=True)]
    assert split_documents(output / "train") == [tokenizer.encode(text, bos=True, eos=True) for text in train]
    manifest = read_manifest(output)
    splits = manifest["splits"]
    assert (splits["train"]["documents"], splits["val"]["documents"], manifest["documents"]) == (39, 1, 40)
    assert splits["val"]["sha256"] == stream_sha256(tokenizer, [SMALL[smallest]])
    assert splits["train"]["sha256"] == stream_sha256(tokenizer, train)
    assert manifest["split"] == {
        "val_fraction": 0.005,
        "seed": 0,
        "rule": SPLIT_RULE,
        "forced_val": {
            "rule": AT_LEAST_ONE_RULE,
            "hash": f"{split_hash(SMALL[smallest]):016x}",
            "path": f"{path}:{smallest + 1}",
        },
    }
    assert (
        f"prepare: val_fraction 0.005 held out none of the 40 documents by hash; holding out the one with the "
        f"smallest hash ({path}:{smallest + 1}), recorded as split.forced_val in the manifest"
    ) in capfd.readouterr().err


def test_the_forced_document_does_not_depend_on_the_number_of_workers(tmp_path, tokenizer):
    halves = [documents_file(tmp_path / "a.jsonl", SMALL[:20]), documents_file(tmp_path / "b.jsonl", SMALL[20:])]
    one = prepare(halves, tokenizer, tmp_path / "one", num_workers=1)
    two = prepare(halves, tokenizer, tmp_path / "two", num_workers=2)
    ours, theirs = read_manifest(one), read_manifest(two)
    assert ours["fingerprint"] == theirs["fingerprint"]
    smallest = f"{min(split_hash(text) for text in SMALL):016x}"
    assert ours["split"]["forced_val"]["hash"] == theirs["split"]["forced_val"]["hash"] == smallest
    assert ours["splits"]["val"]["documents"] == theirs["splits"]["val"]["documents"] == 1
    assert split_documents(tmp_path / "one" / "val") == split_documents(tmp_path / "two" / "val")
    assert split_documents(tmp_path / "one" / "train") == split_documents(tmp_path / "two" / "train")


def test_a_corpus_the_rule_already_splits_keeps_its_split_and_manifest(tmp_path, tokenizer):
    val = [text for text in LARGER if is_validation(text, 0.005)]
    train = [text for text in LARGER if not is_validation(text, 0.005)]
    assert len(val) == 2
    output = tmp_path / "out"
    prepare([documents_file(tmp_path / "larger.jsonl", LARGER)], tokenizer, output, num_workers=1)
    manifest = read_manifest(output)
    assert manifest["split"] == {"val_fraction": 0.005, "seed": 0, "rule": SPLIT_RULE}  # no forced_val entry
    assert (manifest["splits"]["train"]["documents"], manifest["splits"]["val"]["documents"]) == (398, 2)
    assert manifest["splits"]["val"]["sha256"] == stream_sha256(tokenizer, val)
    assert manifest["splits"]["train"]["sha256"] == stream_sha256(tokenizer, train)


def test_a_single_document_with_a_val_fraction_is_refused_on_the_command_line_before_any_work(tmp_path, tokenizer):
    path = documents_file(tmp_path / "one.jsonl", ["the only document"])
    output = tmp_path / "out"
    result = command(tmp_path, "prepare", "--input", path, "--tokenizer", str(tokenizer.path), "--output", str(output))
    assert result.returncode == 1
    assert result.stderr == (
        "prepare: error: val_fraction 0.005 with only 1 document: pass --val_fraction 0 for no val split, or add more\n"
    )
    assert not output.exists() and not list(tmp_path.glob(".out*"))  # no output folder, no hidden staging folder


def test_no_document_is_refused_before_any_work(tmp_path, tokenizer, monkeypatch):
    import moxin_lightning.data.prepare as module

    def no_work(*args, **kwargs):
        raise AssertionError("the workers were started")

    monkeypatch.setattr(module, "write_splits", no_work)
    path = write_records(tmp_path / "none.jsonl", [{"title": "x"}, {"text": ""}, {"title": "y"}])
    with pytest.raises(DataError) as raised:
        prepare([path], tokenizer, tmp_path / "out", num_workers=1)
    assert (
        str(raised.value)
        == "the inputs hold no documents (1 empty text, 2 missing text key); check --input and --text_key"
    )
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


# --------------------------------------------------------------------------------------------------- records


def test_a_small_chat_corpus_holds_out_the_usable_record_with_the_smallest_hash(tmp_path, tokenizer):
    from litdata import StreamingDataset

    good = [user_assistant(f"Question {i}?", f"Answer {i}.") for i in range(20)]
    assert not any(record_hash(record["messages"]) / 2**64 < 0.005 for record in good)
    smallest = min(record_hash(record["messages"]) for record in good)
    # a record too long for max_length (its reply is cut off, so it is skipped) whose hash is smaller still
    long = next(
        record
        for i in range(1000)
        if record_hash((record := user_assistant(f"{i} " + "word " * 60, "late"))["messages"]) < smallest
    )
    path = write_records(tmp_path / "chat.jsonl", [*good[:10], long, *good[10:]])
    output = tmp_path / "out"
    prepare([path], tokenizer, output, format="chat", max_length=64, num_workers=1)

    manifest = read_manifest(output)
    held = min(good, key=lambda record: record_hash(record["messages"]))
    splits = manifest["splits"]
    assert (splits["train"]["records"], splits["val"]["records"]) == (19, 1)
    assert splits["train"]["skipped"] == {TRUNCATED: 1} and splits["val"]["skipped"] == {}
    assert manifest["split"]["forced_val"]["hash"] == f"{smallest:016x}"
    assert manifest["split"]["forced_val"]["path"] == f"{path}:{good.index(held) + 1 + (good.index(held) >= 10)}"
    ids, _ = TuluTemplate().encode(tokenizer, held["messages"])
    assert np.asarray(StreamingDataset(str(output / "val"))[0]["ids"]).tolist() == list(ids)


def test_a_single_chat_record_with_a_val_fraction_is_refused_on_the_command_line(tmp_path, tokenizer):
    path = write_records(tmp_path / "chat.jsonl", [user_assistant("Hi?", "Hello."), {"text": "no chat"}])
    output = tmp_path / "out"
    words = (
        "prepare",
        "--format",
        "chat",
        "--input",
        path,
        "--tokenizer",
        str(tokenizer.path),
        "--output",
        str(output),
    )
    result = command(tmp_path, *words, "--val_fraction", "0.1")
    assert result.returncode == 1
    assert result.stderr == (
        "prepare: error: val_fraction 0.1 with only 1 usable chat record: pass val_fraction 0 for no val split, "
        "or add more\n"
    )
    assert not output.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--format", "chat", "--truncation", "right"), "--truncation does not apply to --format chat; drop it"),
        (("--format", "preference", "--truncation", "left"), "--truncation 'left' is not one of prompt_first, right"),
        (
            ("--format", "preference", "--reasoning_markers", "think"),
            "--reasoning_markers does not apply to --format preference; drop it",
        ),
        (("--reasoning_markers", "keep"), "--reasoning_markers does not apply to --format documents; drop it"),
        (("--format", "chat", "--reasoning_markers", "xml"), "--reasoning_markers 'xml' is not one of keep, think"),
    ],
    ids=["truncation-chat", "truncation-value", "markers-preference", "markers-documents", "markers-value"],
)
def test_a_format_setting_is_checked_on_the_command_line_before_any_work(tmp_path, tokenizer, flags, message):
    """truncation belongs to preference records, reasoning_markers to chat records; each takes named values."""
    path = write_records(tmp_path / "pairs.jsonl", [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "No."}])
    words = ("prepare", "--input", path, "--tokenizer", str(tokenizer.path), "--output", str(tmp_path / "out"))
    refused = command(tmp_path, *words, *flags)
    assert (refused.returncode, refused.stderr) == (1, f"prepare: error: {message}\n")
    assert not (tmp_path / "out").exists()


def test_reasoning_markers_think_is_recorded_in_the_manifest(tmp_path, tokenizer):
    chat = write_records(tmp_path / "chat.jsonl", [user_assistant("Hi?", "<|begin_of_thought|>Hm<|end_of_thought|>")])
    chat_words = ("prepare", "--input", chat, "--tokenizer", str(tokenizer.path), "--output", str(tmp_path / "out"))
    think = command(tmp_path, *chat_words, "--format", "chat", "--reasoning_markers", "think", "--val_fraction", "0")
    assert think.returncode == 0, think.stderr
    assert read_manifest(tmp_path / "out")["records"]["reasoning_markers"] == "think"
