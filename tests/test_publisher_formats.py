"""Moxin's corpora in the shapes their publishers ship, a few records each (`tests/publisher_records.py`).

Pretraining corpora (SlimPajama-627B, DCLM-baseline as zstd JSON lines and as parquet, the-stack-dedup) go through
the real command line, `python -m moxin_lightning prepare --input '<the published glob>'`, and the shards must equal
BOS + encode(text) + EOS of exactly the published texts, in order. The instruction sets (Tülu 3 SFT and preference
mixtures, DeepScaleR's JSON array) must come out of `read_objects`, the reader the chat, preference and prompt data
use, as the publisher's objects. Then what those shapes need from the readers: JSON arrays, multi-frame and cut-off
zstd, and `hf://` URLs read through fsspec.
"""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from moxin_lightning.data import DataError, read_manifest
from moxin_lightning.data.prepare import prepare
from moxin_lightning.data.sources import (
    BAD_JSON,
    INVALID_UTF8,
    MISSING_KEY,
    NOT_AN_OBJECT,
    FileSource,
    SourceStats,
    expand_input,
    read_objects,
)
from moxin_lightning.tokenizers import SentencePieceTokenizer
from tests.prepared_data import fresh_environment
from tests.publisher_records import (
    code_snippets,
    conversations,
    docstrings,
    math_problems,
    preference_pairs,
    write_dclm,
    write_dclm_parquet,
    write_deepscaler,
    write_slimpajama,
    write_the_stack,
    write_tulu_preference,
    write_tulu_sft,
)

zstandard = pytest.importorskip("zstandard", reason="SlimPajama and DCLM ship zstd files: pip install zstandard")

NON_ENGLISH = "Ein naïver Satz über das Café — 世界 und 🚀, wie ihn Common Crawl auch enthält."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docstrings(10) + code_snippets(5)), model_writer=model, vocab_size=400,
        model_type="bpe", byte_fallback=True, hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return SentencePieceTokenizer(path)


def documents(folder: Path) -> list[list[int]]:
    """Every document of a prepared split, in order, through litdata's reader (what PretrainData reads)."""
    from litdata import StreamingDataset

    dataset = StreamingDataset(str(folder))
    return [np.asarray(dataset[i]).tolist() for i in range(len(dataset))]


def prepare_command(tmp_path: Path, pattern: str, tokenizer, *options: str) -> tuple[dict, Path]:
    """`python -m moxin_lightning prepare` as a user types it; the manifest and the output folder."""
    output = tmp_path / "prepared"
    words = [sys.executable, "-m", "moxin_lightning", "prepare", "--input", pattern, "--tokenizer", str(tokenizer.path)]
    words += ["--output", str(output), "--num_workers", "1", "--val_fraction", "0", *options]
    result = subprocess.run(words, env=fresh_environment(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return read_manifest(output), output


PRETRAINING = {
    "slimpajama": lambda folder: write_slimpajama(folder, [*docstrings(4), NON_ENGLISH]),
    "dclm-baseline": lambda folder: write_dclm(folder, docstrings(3)),
    "dclm-baseline-parquet": lambda folder: write_dclm_parquet(folder, docstrings(3)),
    "the-stack-dedup": lambda folder: write_the_stack(
        folder, {"python": code_snippets(3), "c": ["int main(void) {}\n"]}
    ),
}


@pytest.mark.parametrize("corpus", sorted(PRETRAINING))
def test_a_pretraining_corpus_as_published_prepares_from_the_command_line(tmp_path, tokenizer, corpus):
    published = PRETRAINING[corpus](tmp_path / corpus)
    key = "content" if corpus == "the-stack-dedup" else "text"
    options = ["--text_key", key] if key != "text" else []
    manifest, output = prepare_command(tmp_path, published.input, tokenizer, *options)

    texts = [record[key] for record in published.records]
    encoded = [tokenizer.encode(text, bos=True, eos=True) for text in texts]
    assert documents(output / "train") == encoded  # every published text, BOS + ids + EOS, in input order
    assert manifest["documents"] == manifest["splits"]["train"]["documents"] == len(texts)
    assert manifest["splits"]["train"]["tokens"] == sum(len(ids) for ids in encoded)
    assert [source["path"] for source in manifest["sources"]] == [str(path) for path in published.files]
    assert all(source["skipped"] == {} for source in manifest["sources"])


def test_the_published_records_are_what_the_readers_get(tmp_path):
    """The writers' shapes: the first SlimPajama line, the first DCLM record and the Stack's columns as stored."""
    slimpajama = write_slimpajama(tmp_path / "sp", docstrings(3))
    first = zstandard.ZstdDecompressor().decompressobj().decompress(slimpajama.files[0].read_bytes())
    assert json.loads(first.splitlines()[0]) == {
        "text": docstrings(1)[0],
        "meta": {"redpajama_set_name": "RedPajamaCommonCrawl"},
    }
    assert [path.relative_to(tmp_path / "sp").as_posix() for path in slimpajama.files] == [
        "train/chunk1/example_train_0.jsonl.zst",
        "train/chunk1/example_train_1.jsonl.zst",
    ]
    dclm = write_dclm(tmp_path / "dclm", docstrings(1))
    assert sorted(dclm.records[0]) == [
        "bff_contained_ngram_count_before_dedupe", "fasttext_openhermes_reddit_eli5_vs_rw_v2_bigram_200k_train_prob",
        "language_id_whole_page_fasttext", "metadata", "previous_word_count", "text", "url", "warcinfo",
    ]  # fmt: skip
    import pyarrow.parquet as pq

    stack = write_the_stack(tmp_path / "stack", {"python": code_snippets(1)})
    assert pq.read_table(stack.files[0]).column("content").to_pylist() == code_snippets(1)
    assert stack.files[0].relative_to(tmp_path / "stack").as_posix() == "data/python/data-00000-of-00001.parquet"


def test_the_stack_without_text_key_content_names_its_columns(tmp_path, tokenizer):
    published = write_the_stack(tmp_path / "stack", {"python": code_snippets(1)})
    with pytest.raises(DataError) as raised:
        prepare([published.input], tokenizer, tmp_path / "out", num_workers=1, val_fraction=0)
    assert str(raised.value) == (
        f"{published.files[0]} has no column 'text' (columns: hexsha, size, ext, lang, max_stars_repo_path, "
        "max_stars_repo_name, max_stars_repo_head_hexsha, max_stars_repo_licenses, max_stars_count, content, "
        "avg_line_length, max_line_length, alphanum_fraction); pass --text_key"
    )


# ------------------------------------------------------------------------------------------- instruction sets


def objects(spec: str, needs: tuple[str, ...] = (), all_columns: bool = True) -> list:
    return list(read_objects(spec, needs, all_columns=all_columns, not_text="{path} is text", missing="{path}"))


def test_tulu_sft_messages_come_back_as_role_content_dicts(tmp_path):
    chats = conversations(3)
    published = write_tulu_sft(tmp_path / "tulu-3-sft-mixture", chats)
    found = objects(published.input, ("messages",), all_columns=False)  # what ChatData asks for
    assert [record.value for record in found] == [{"messages": chat} for chat in chats]
    assert [record.where for record in found] == [
        f"{published.files[0]}#0", f"{published.files[0]}#1", f"{published.files[1]}#0"
    ]  # fmt: skip
    assert found[0].value["messages"][0] == {"content": "You are a concise Python tutor.", "role": "system"}
    assert [record.value for record in objects(published.input)] == published.records  # id, messages, source


def test_tulu_preference_pairs_come_back_with_the_user_turn_first(tmp_path):
    pairs = preference_pairs(3)
    published = write_tulu_preference(tmp_path / "tulu-3-preference-mixture", pairs)
    found = [record.value for record in objects(published.input, ("chosen", "rejected"))]  # what PreferenceData asks
    assert found == published.records
    for record, (prompt, chosen, rejected) in zip(found, pairs, strict=True):
        assert sorted(record) == ["chosen", "id", "prompt", "rejected", "source"]
        assert record["prompt"] == prompt
        assert record["chosen"] == [{"content": prompt, "role": "user"}, {"content": chosen, "role": "assistant"}]
        assert record["rejected"] == [{"content": prompt, "role": "user"}, {"content": rejected, "role": "assistant"}]


@pytest.mark.parametrize("compression", ["", ".gz", ".zst"])
def test_deepscaler_json_array_comes_back_object_by_object(tmp_path, compression):
    problems = math_problems(3)
    published = write_deepscaler(tmp_path / "deepscaler", problems)
    path = published.files[0]
    if compression:
        raw = path.read_bytes()
        packed = gzip.compress(raw) if compression == ".gz" else zstandard.ZstdCompressor().compress(raw)
        path = path.with_name(path.name + compression)
        path.write_bytes(packed)
    found = objects(str(path))
    assert [record.value for record in found] == problems
    assert found[0].value["answer"] == "\\frac{3}{2}" and "\\boxed{24}" in found[1].value["solution"]
    assert [record.where for record in found] == [f"{path}[{i}]" for i in range(3)]


def test_deepscaler_problems_prepare_as_documents(tmp_path, tokenizer):
    """A JSON array is a document source too: `prepare --input deepscaler.json --text_key problem`."""
    published = write_deepscaler(tmp_path / "deepscaler", math_problems(3))
    prepare([published.input], tokenizer, tmp_path / "out", text_key="problem", num_workers=1, val_fraction=0)
    manifest = read_manifest(tmp_path / "out")
    problems = [record["problem"] for record in published.records]
    assert documents(tmp_path / "out" / "train") == [tokenizer.encode(p, bos=True, eos=True) for p in problems]
    assert manifest["sources"][0]["bytes"] == published.files[0].stat().st_size


# ------------------------------------------------------------------------------------ what the readers handle


def read_documents(path: Path, text_key: str = "text") -> tuple[list, SourceStats]:
    stats = SourceStats(str(path), str(path))
    return list(FileSource(str(path), text_key).read(stats)), stats


def test_json_array_elements_are_judged_like_jsonl_lines(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_bytes(b'  [{"text": "one"}, 7, {"title": "x"},\n {"text": "caf\xe9"}, {"text": "two"} ]\n')
    records, stats = read_documents(path)
    assert [(r.where, r.text, r.skip) for r in records] == [
        (f"{path}[0]", "one", None), (f"{path}[1]", None, NOT_AN_OBJECT), (f"{path}[2]", None, MISSING_KEY),
        (f"{path}[3]", None, INVALID_UTF8), (f"{path}[4]", "two", None),
    ]  # fmt: skip
    assert stats.bytes == path.stat().st_size  # the file is hashed as read
    empty = tmp_path / "empty.json"
    empty.write_text("[ ]\n")
    assert objects(str(empty)) == []


def test_a_json_file_of_json_lines_is_read_as_lines(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('\n{"text": "first"}\nnot json\n{"text": "second"}\n')
    records, _ = read_documents(path)
    assert [(r.where, r.text, r.skip) for r in records] == [
        (f"{path}:2", "first", None), (f"{path}:3", None, BAD_JSON), (f"{path}:4", "second", None)
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'[{"text": "a"}, {"text": "b"}', "expected ',' or ']' after element 1, found the end of the file"),
        (b'[{"text": "a"} {"text": "b"}]', "expected ',' or ']' after element 0, found '{'"),
        (b'[{"text": "a"}, {"text": "b}]', "JSON array element 1: Unterminated string starting at"),
        (b'[{"text": "a"}] [', "JSON array: data after its closing ']'"),
    ],
)
def test_a_broken_json_array_is_a_one_line_error_naming_the_element(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    for read in (lambda: read_documents(path), lambda: objects(str(path))):
        with pytest.raises(DataError) as raised:
            read()
        assert str(raised.value).startswith(f"cannot read {path}: JSON array")
        assert message in str(raised.value) and str(raised.value).endswith("; fix or remove the file")
        assert "\n" not in str(raised.value)


def test_a_large_json_array_streams_across_read_chunks(tmp_path, monkeypatch):
    """Elements longer than a read chunk, and numbers cut at a chunk's end, parse as json.load parses them."""
    import moxin_lightning.data.sources as sources

    monkeypatch.setattr(sources, "_CHUNK", 64)
    values = [{"text": f"element {i} " + "x" * (i * 37 % 300), "n": 10**12 + i} for i in range(200)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(values, indent=1))
    assert [record.value for record in objects(str(path))] == json.loads(path.read_text())


def test_zstd_files_of_several_frames_are_read_whole(tmp_path, tokenizer):
    texts = docstrings(4)
    published = write_dclm(tmp_path / "dclm", texts, per_file=4, frames=3)
    records, stats = read_documents(published.files[0])
    assert [record.text for record in records] == texts
    assert stats.bytes == published.files[0].stat().st_size
    assert [record.value["text"] for record in objects(published.input)] == texts


def test_a_cut_off_or_corrupt_zstd_file_is_a_one_line_error(tmp_path):
    published = write_slimpajama(tmp_path / "sp", docstrings(2), per_file=2)
    whole = published.files[0].read_bytes()
    cut, corrupt = tmp_path / "cut.jsonl.zst", tmp_path / "corrupt.jsonl.zst"
    cut.write_bytes(whole[: len(whole) // 2])
    corrupt.write_bytes(b"not zstd data" + whole)
    for path, message in [
        (cut, "the zstd stream ends inside a frame (a truncated file)"),
        (corrupt, "corrupt zstd data: "),
    ]:
        for read in (lambda path=path: read_documents(path), lambda path=path: objects(str(path))):
            with pytest.raises(DataError) as raised:
                read()
            assert str(raised.value).startswith(f"cannot read {path}: {message}")
            assert str(raised.value).endswith("; fix or remove the file") and "\n" not in str(raised.value)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """`hf://` served from a local folder: a stand-in for huggingface_hub's HfFileSystem, which names files
    `hf://datasets/<org>/<name>/<path>` exactly like this (no hub is reachable from the tests)."""
    import importlib

    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    root = tmp_path / "hub"

    class LocalHub(DirFileSystem):
        protocol = "hf"
        root_marker = ""

        def __init__(self, **options):
            super().__init__(path=str(root), fs=LocalFileSystem(), **options)

    monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, "hf", LocalHub)
    return root


def test_hf_urls_are_read_through_fsspec(hub, tmp_path, tokenizer):
    texts = docstrings(3)
    write_slimpajama(hub / "datasets" / "cerebras" / "SlimPajama-627B", texts)
    url = "hf://datasets/cerebras/SlimPajama-627B/train/chunk*/example_train_*.jsonl.zst"
    assert [source.path for source in expand_input(url)] == [
        "hf://datasets/cerebras/SlimPajama-627B/train/chunk1/example_train_0.jsonl.zst",
        "hf://datasets/cerebras/SlimPajama-627B/train/chunk1/example_train_1.jsonl.zst",
    ]
    manifest = read_manifest(prepare([url], tokenizer, tmp_path / "out", num_workers=1, val_fraction=0))
    assert documents(tmp_path / "out" / "train") == [tokenizer.encode(t, bos=True, eos=True) for t in texts]
    assert manifest["sources"][0]["path"].startswith("hf://datasets/cerebras/SlimPajama-627B/train/chunk1/")

    write_tulu_sft(hub / "datasets" / "allenai" / "tulu-3-sft-mixture", conversations(2))
    found = objects("hf://datasets/allenai/tulu-3-sft-mixture/data/train-*.parquet", ("messages",), False)
    assert [record.value["messages"] for record in found] == conversations(2)


def test_hf_is_huggingface_hubs_filesystem_and_an_unknown_scheme_is_a_one_line_error():
    import fsspec

    pytest.importorskip("huggingface_hub")
    assert fsspec.get_filesystem_class("hf").__name__ == "HfFileSystem"
    with pytest.raises(DataError, match=r"^--input nosuch://bucket/a\.jsonl: fsspec cannot open it: .*nosuch"):
        expand_input("nosuch://bucket/a.jsonl")
