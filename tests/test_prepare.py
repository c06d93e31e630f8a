"""`prepare`: shards equal the tokenizer's own encoding token for token; counts, skips, refusals and errors.

The shards are read back with litdata's `StreamingDataset` + `TokensLoader` (block_size=1, so no token is cut
off at a chunk end) and compared with BOS + encode(text) + EOS of the documents in input order.
"""

from __future__ import annotations

import argparse
import ast
import bz2
import gzip
import hashlib
import io
import json
import lzma
import multiprocessing
import os
import platform
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from moxin_lightning.data import DataError, PrepareError, is_validation, read_manifest
from moxin_lightning.data.builtin import (
    PART_BYTES,
    code_files,
    corpus_fingerprint,
    expand_builtin,
    iter_documents,
    module_docstrings,
)
from moxin_lightning.data.prepare import prepare, register
from moxin_lightning.data.shards import read_tokens
from moxin_lightning.tokenizers import SentencePieceTokenizer, load_tokenizer

TRAINING_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "a tokenizer turns text into ids and back again",
    "documents are framed by begin and end of sequence tokens",
    "shards hold int32 token ids written by litdata workers",
] * 20
DOCUMENTS = [
    "Hello world, this is the first document.",
    "Second document: naïve café, 世界 and emoji 🚀 fall back to bytes.",
    "Third one\nhas two lines.",
    "  leading and trailing spaces are kept  ",
    "The last document of the file.",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT), model_writer=model, vocab_size=300, model_type="bpe",
        byte_fallback=True, hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return SentencePieceTokenizer(path)


def expected(tokenizer, texts) -> list[int]:
    return [token for text in texts for token in tokenizer.encode(text, bos=True, eos=True)]


def documents(folder: Path) -> list[list[int]]:
    """Every item of a split, through litdata's default reader: one document each (what PretrainData reads)."""
    from litdata import StreamingDataset

    dataset = StreamingDataset(str(folder))
    return [np.asarray(dataset[i]).tolist() for i in range(len(dataset))]


def streamed(folder: Path) -> list[int]:
    """Every token of a split, concatenated, through litdata's reader for its layout."""
    import litdata

    if json.loads((folder / "index.json").read_text())["config"]["item_loader"] == "PyTreeLoader":
        return [token for document in documents(folder) for token in document]
    dataset = litdata.StreamingDataset(str(folder), item_loader=litdata.TokensLoader(block_size=1))
    return np.concatenate([dataset[i] for i in range(len(dataset))]).tolist()


def write_jsonl(path: Path, records, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as file:
        file.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return path


def run(inputs, tokenizer, output, **kwargs) -> dict:
    prepare(inputs, tokenizer, output, **{"num_workers": 1, "val_fraction": 0.0, **kwargs})
    return read_manifest(output)


def write_txt(folder: Path, texts) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"doc{i:02d}.txt" for i in range(len(texts))]
    for path, text in zip(paths, texts, strict=True):
        path.write_text(text, encoding="utf-8")
    return paths


def write_parquet(path: Path, texts, key="text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({key: texts, "id": list(range(len(texts)))}), path, row_group_size=2)
    return path


@pytest.mark.parametrize(
    "kind",
    ["txt", "jsonl", "jsonl.gz", "jsonl.bz2", "jsonl.xz", "parquet"],
)
def test_shards_equal_the_tokenizers_encoding_token_for_token(tmp_path, tokenizer, kind):
    if kind == "txt":
        write_txt(tmp_path / "in", DOCUMENTS)
        pattern = str(tmp_path / "in" / "*.txt")
    elif kind == "parquet":
        pattern = str(write_parquet(tmp_path / "docs.parquet", DOCUMENTS))
    else:
        opener = {"jsonl": open, "jsonl.gz": gzip.open, "jsonl.bz2": bz2.open, "jsonl.xz": lzma.open}[kind]
        pattern = str(write_jsonl(tmp_path / f"docs.{kind}", [{"text": t} for t in DOCUMENTS], opener))
    manifest = run([pattern], tokenizer, tmp_path / "out")
    tokens = expected(tokenizer, DOCUMENTS)
    assert documents(tmp_path / "out" / "train") == [tokenizer.encode(t, bos=True, eos=True) for t in DOCUMENTS]
    assert streamed(tmp_path / "out" / "train") == tokens
    assert manifest["splits"]["train"]["documents"] == len(DOCUMENTS)
    assert manifest["splits"]["train"]["tokens"] == len(tokens)
    assert "val" not in manifest["splits"] and not (tmp_path / "out" / "val").exists()
    if kind != "txt":  # a file is hashed as stored (compressed), so sha256sum on it agrees
        raw = Path(pattern).read_bytes()
        assert manifest["sources"][0]["sha256"] == hashlib.sha256(raw).hexdigest()
        assert manifest["sources"][0]["bytes"] == len(raw)
    else:
        assert [source["documents"] for source in manifest["sources"]] == [1] * len(DOCUMENTS)


def test_val_split_is_the_hash_choice_and_both_splits_are_exact(tmp_path, tokenizer):
    texts = [f"document number {i} says {'hello ' * (i % 7)}" for i in range(60)]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"body": t} for t in texts])
    manifest = run([str(path)], tokenizer, tmp_path / "out", val_fraction=0.2, seed=7, text_key="body")
    val = [t for t in texts if is_validation(t, 0.2, seed=7)]
    train = [t for t in texts if not is_validation(t, 0.2, seed=7)]
    assert 0 < len(val) < len(texts)
    assert streamed(tmp_path / "out" / "val") == expected(tokenizer, val)
    assert streamed(tmp_path / "out" / "train") == expected(tokenizer, train)
    assert manifest["splits"]["val"]["documents"] == len(val)
    assert manifest["splits"]["train"]["documents"] == len(train)
    assert manifest["documents"] == 60
    assert [t for t in texts if is_validation(t, 0.2, seed=8)] != val  # the seed matters


def test_token_stream_and_fingerprint_do_not_depend_on_workers_or_chunking(tmp_path, tokenizer):
    texts = [f"file {i}: " + " ".join(TRAINING_TEXT[i : i + 9]) for i in range(12)]
    write_txt(tmp_path / "in", texts)
    pattern = str(tmp_path / "in" / "*.txt")
    one = run([pattern], tokenizer, tmp_path / "one", num_workers=1, val_fraction=0.25)
    two = run([pattern], tokenizer, tmp_path / "two", num_workers=2, val_fraction=0.25, chunk_bytes=600)
    assert two["splits"]["train"]["chunks"] > one["splits"]["train"]["chunks"] == 1
    train = [t for t in texts if not is_validation(t, 0.25)]
    for folder in ("one", "two"):
        assert np.concatenate(list(read_tokens(tmp_path / folder / "train"))).tolist() == expected(tokenizer, train)
        assert streamed(tmp_path / folder / "train") == expected(tokenizer, train)
    assert one["fingerprint"] == two["fingerprint"]
    assert one["splits"]["train"]["sha256"] == two["splits"]["train"]["sha256"]


def test_tokens_layout_reads_back_with_tokens_loader_and_is_the_same_data(tmp_path, tokenizer):
    texts = [f"{text} ({i})" for i, text in enumerate(DOCUMENTS * 6)]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    docs = run([str(path)], tokenizer, tmp_path / "docs", val_fraction=0.2)
    flat = run([str(path)], tokenizer, tmp_path / "flat", val_fraction=0.2, layout="tokens")
    for split in ("train", "val"):
        chosen = [t for t in texts if is_validation(t, 0.2) == (split == "val")]
        assert streamed(tmp_path / "flat" / split) == expected(tokenizer, chosen)
        assert streamed(tmp_path / "docs" / split) == expected(tokenizer, chosen)
        assert flat["splits"][split]["sha256"] == docs["splits"][split]["sha256"]
    assert (flat["layout"], docs["layout"]) == ("tokens", "documents")
    assert "TokensLoader(block_size=n)" in flat["read_with"]
    from litdata import StreamingDataset

    with pytest.raises(ValueError, match="TokensLoader"):  # litdata's readers do not share the layouts
        StreamingDataset(str(tmp_path / "flat" / "train"))[0]


def test_pretrain_data_reads_a_prepared_dataset(tmp_path, tokenizer):
    from moxin_lightning.datamodules.pretrain import PretrainData

    texts = [f"{text} ({i})" for i, text in enumerate(DOCUMENTS * 6)]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    run([str(path)], tokenizer, tmp_path / "out", val_fraction=0.2)
    data = PretrainData([str(tmp_path / "out")], seq_len=16, batch_size=2, shuffle=False, docs_per_read=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    train = expected(tokenizer, [t for t in texts if not is_validation(t, 0.2)])
    assert batch["input_ids"].flatten().tolist() == train[: batch["input_ids"].numel()]


def test_manifest_counts_skips_with_reasons_and_describes_the_tokenizer(tmp_path, tokenizer):
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b'{"text": "bad \xff byte"}',
        b"{not json",
        json.dumps({"title": "no text"}).encode(),
        json.dumps({"text": "   "}).encode(),
        json.dumps(["a", "list"]).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "lone \ud800 surrogate"}).encode(),
        b"",  # a blank line is not a record
        json.dumps({"text": "good two"}).encode(),
    ]
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "bad.txt").write_bytes(b"latin-1 \xe9t\xe9")
    manifest = run([str(jsonl), str(tmp_path / "bad.txt")], tokenizer, tmp_path / "out")

    mixed, bad = manifest["sources"]
    assert mixed["documents"] == 2
    assert mixed["skipped"] == {
        "empty text": 1, "invalid UTF-8": 2, "missing text key": 1, "not a JSON object": 1,
        "text not a string": 1, "unreadable JSON line": 1,
    }  # fmt: skip
    assert mixed["skipped_examples"][:2] == [f"{jsonl}:2: invalid UTF-8", f"{jsonl}:3: unreadable JSON line"]
    assert (bad["documents"], bad["skipped"]) == (0, {"invalid UTF-8": 1})
    assert streamed(tmp_path / "out" / "train") == expected(tokenizer, ["good one", "good two"])
    assert manifest["tokenizer"] == {
        "fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size, "bos_id": 1, "eos_id": 2,
        "path": str(tokenizer.path), "saved": "tokenizer",
    }  # fmt: skip
    saved = load_tokenizer(tmp_path / "out" / manifest["tokenizer"]["saved"])  # the data carries its tokenizer
    assert saved.fingerprint == tokenizer.fingerprint
    assert manifest["dtype"] == "int32"
    assert manifest["moxin_lightning_version"] == __import__("moxin_lightning").__version__
    assert manifest["documents"] == 2 and manifest["tokens"] == manifest["splits"]["train"]["tokens"]


def test_fingerprint_identifies_the_data_not_where_or_when(tmp_path, tokenizer):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_jsonl(tmp_path / "a" / "docs.jsonl", [{"text": t} for t in DOCUMENTS])
    (tmp_path / "b" / "moved.jsonl").write_bytes((tmp_path / "a" / "docs.jsonl").read_bytes())
    first = run([str(tmp_path / "a" / "docs.jsonl")], tokenizer, tmp_path / "out1")
    moved = run([str(tmp_path / "b" / "moved.jsonl")], tokenizer, tmp_path / "out2")
    assert first["fingerprint"] == moved["fingerprint"]
    write_jsonl(tmp_path / "b" / "moved.jsonl", [{"text": t} for t in DOCUMENTS[:-1]])
    changed = run([str(tmp_path / "b" / "moved.jsonl")], tokenizer, tmp_path / "out3")
    assert changed["fingerprint"] != first["fingerprint"]


def test_an_existing_dataset_is_refused_unless_overwrite(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in DOCUMENTS])
    first = run([str(path)], tokenizer, tmp_path / "out")
    with pytest.raises(FileExistsError, match=r"already holds a prepared dataset; pass --overwrite to replace it$"):
        run([str(path)], tokenizer, tmp_path / "out")
    write_jsonl(path, [{"text": t} for t in DOCUMENTS[:2]])
    second = run([str(path)], tokenizer, tmp_path / "out", overwrite=True)
    assert second["documents"] == 2 != first["documents"]
    assert streamed(tmp_path / "out" / "train") == expected(tokenizer, DOCUMENTS[:2])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty and is not a prepared dataset"):
        run([str(path)], tokenizer, tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "other", "out"]  # no temp folders left


def test_temp_folders_of_dead_runs_are_removed_and_live_ones_kept(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in DOCUMENTS])
    dead, live = (
        tmp_path / ".out.tmp-4194303-deadbeef",
        tmp_path / f".out.tmp-{os.getppid()}-running",
    )  # another live process
    dead.mkdir()
    live.mkdir()
    run([str(path)], tokenizer, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "docs.jsonl", "out"]


class ExplodingTokenizer(SentencePieceTokenizer):
    """Raises on the document that contains EXPLODE, after earlier sources were already written."""

    def encode_batch(self, texts):
        if any("EXPLODE" in text for text in texts):
            raise ValueError("tokenizer exploded")
        return super().encode_batch(texts)


def test_a_crash_mid_run_leaves_no_half_written_output(tmp_path, tokenizer):
    texts = [f"healthy document {i}" for i in range(6)]
    write_txt(tmp_path / "in", [*texts, "this one will EXPLODE", "never reached"])
    exploding = ExplodingTokenizer(tokenizer.path)
    pattern = str(tmp_path / "in" / "*.txt")
    with pytest.raises(PrepareError, match=r"tokenizing .*doc06\.txt failed: ValueError: tokenizer exploded$"):
        run([pattern], exploding, tmp_path / "out", num_workers=2)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]

    good = run([str(tmp_path / "in" / "doc0[0-2].txt")], tokenizer, tmp_path / "out")
    with pytest.raises(PrepareError, match="tokenizer exploded"):
        run([pattern], exploding, tmp_path / "out", overwrite=True)
    assert read_manifest(tmp_path / "out")["fingerprint"] == good["fingerprint"]  # the old dataset is intact
    assert streamed(tmp_path / "out" / "train") == expected(tokenizer, texts[:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_a_moe_tokenizer_folder_is_loaded_as_one(tmp_path, tokenizer):
    from moxin_lightning.tokenizers import MoETokenizer

    moe = MoETokenizer(tokenizer.path, {})
    moe.save(tmp_path / "moe")
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in DOCUMENTS])
    manifest = run([str(path)], str(tmp_path / "moe"), tmp_path / "out")
    assert manifest["tokenizer"]["fingerprint"] == moe.fingerprint != tokenizer.fingerprint
    assert streamed(tmp_path / "out" / "train") == expected(moe, DOCUMENTS)


def test_prepare_leaves_the_callers_process_state_alone(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in DOCUMENTS])
    method = multiprocessing.get_start_method(allow_none=True)
    handler = signal.getsignal(signal.SIGINT)
    random.seed(5)
    np.random.seed(5)
    run([str(path)], tokenizer, tmp_path / "out")
    after = (random.random(), np.random.rand())
    random.seed(5)
    np.random.seed(5)
    assert after == (random.random(), np.random.rand())
    assert multiprocessing.get_start_method(allow_none=True) == method
    assert signal.getsignal(signal.SIGINT) is handler  # litdata installs one that exits with status 0


def test_fsspec_urls_are_read(tmp_path, tokenizer):
    import fsspec

    with fsspec.open("memory://corpus/part-0.jsonl", "wt") as file:
        file.writelines(json.dumps({"text": t}) + "\n" for t in DOCUMENTS)
    manifest = run(["memory://corpus/*.jsonl"], tokenizer, tmp_path / "out")
    assert manifest["sources"][0]["path"] == "memory:///corpus/part-0.jsonl"
    assert streamed(tmp_path / "out" / "train") == expected(tokenizer, DOCUMENTS)


def error_cases(tmp: Path) -> list[tuple[list[str], dict, type, str]]:
    write_jsonl(tmp / "ok.jsonl", [{"text": t} for t in DOCUMENTS])
    write_jsonl(tmp / "none.jsonl", [{"title": "x"}, {"text": ""}])
    (tmp / "corrupt.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:40])
    (tmp / "table.csv").write_text("text\nhello\n")
    write_parquet(tmp / "wrong.parquet", ["a", "b"], key="content")
    write_jsonl(tmp / "one.jsonl", [{"text": DOCUMENTS[0]}])
    ok, one = str(tmp / "ok.jsonl"), str(tmp / "one.jsonl")
    return [
        ([str(tmp / "nothing" / "*.jsonl")], {}, DataError, r"matched no files; check the path and quote the glob"),
        ([str(tmp / "missing.jsonl")], {}, DataError, r"missing\.jsonl not found; check the path"),
        ([str(tmp / "table.csv")], {}, DataError, r"unsupported input .*table\.csv: expected \.txt, \.jsonl"),
        ([str(tmp / "wrong.parquet")], {}, DataError,
         r"has no column 'text' \(columns: content, id\); pass --text_key"),
        ([str(tmp / "corrupt.jsonl.gz")], {}, DataError,
         r"cannot read .*corrupt\.jsonl\.gz: .*; fix or remove the file"),
        ([str(tmp / "none.jsonl")], {}, DataError, r"no documents \(1 empty text, 1 missing text key\); check --input"),
        ([one], {"val_fraction": 0.001}, DataError, r"val_fraction 0\.001 with only 1 document: pass --val_fraction 0"),
        ([ok], {"val_fraction": 1.5}, DataError, r"val_fraction must be in \[0, 1\)"),
        ([], {}, DataError, r"no --input given"),
        (["builtin:poetry"], {}, DataError,
         r"unknown builtin:poetry: the built-in corpora are builtin:local, builtin:code, builtin:prose"),
        (["builtin:code?max_gb=1"], {}, DataError, r"unknown option 'max_gb' in builtin:code\?max_gb=1"),
        (["builtin:code?max_documents=0"], {}, DataError, r"holds no documents"),
    ]  # fmt: skip


def test_errors_are_one_line_and_name_the_fix(tmp_path, tokenizer):
    for inputs, kwargs, error, message in error_cases(tmp_path):
        with pytest.raises(error, match=message) as raised:
            run(inputs, tokenizer, tmp_path / "out", **kwargs)
        assert "\n" not in str(raised.value), str(raised.value)
        assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="pass a SentencePiece tokenizer.model or its folder"):
        run([str(tmp_path / "ok.jsonl")], str(tmp_path / "no-tokenizer.model"), tmp_path / "out")


def test_zstd_without_zstandard_says_what_to_install(tmp_path, tokenizer, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if it were not installed
    (tmp_path / "docs.jsonl.zst").write_bytes(b"")
    with pytest.raises(DataError, match=r"docs\.jsonl\.zst is zstd-compressed: pip install zstandard to read it$"):
        run([str(tmp_path / "*.jsonl.zst")], tokenizer, tmp_path / "out")


def test_builtin_corpora_are_deterministic_and_split_into_code_and_prose():
    code = [list(iter_documents("builtin:code?max_documents=6")) for _ in range(2)]
    prose = [list(iter_documents("builtin:prose?max_documents=6")) for _ in range(2)]
    assert code[0] == code[1] and prose[0] == prose[1]
    code_docs = [record for record in code[0] if record.text is not None]
    prose_docs = [record for record in prose[0] if record.text is not None]
    assert len(code_docs) >= 3 and len(prose_docs) == 6
    assert [record.where for record in code[0]] == [where for where, _ in code_files()[:6]]
    assert all(record.where.startswith("stdlib/") and record.where.endswith(".py") for record in code_docs)
    for record in code_docs:
        ast.parse(record.text)  # code is Python source
    assert [record.where for record in prose_docs][:2] == ["pydoc:topics/assert", "pydoc:topics/assignment"]
    assert prose_docs[0].text.startswith('The "assert" statement')
    assert {r.text for r in code_docs}.isdisjoint(r.text for r in prose_docs)


def test_builtin_prose_holds_docstrings_not_code():
    stdlib = Path(ast.__file__).parent
    record = module_docstrings("docstrings:json/decoder.py", stdlib / "json" / "decoder.py")
    assert record.text.startswith("module json.decoder\n\nImplementation of JSONDecoder")
    assert "class json.decoder.JSONDecoder\n\nSimple JSON <https://json.org> decoder" in record.text
    assert "function json.decoder.JSONDecoder.decode\n\n" in record.text
    assert "def " not in record.text and "import re" not in record.text
    empty = module_docstrings("docstrings:x.py", stdlib / "__phello__" / "spam.py")
    assert (empty.text, empty.skip) == (None, "no docstrings")
    wheres = [r.where for r in iter_documents("builtin:prose?max_documents=400")]
    topics = [where for where in wheres if where.startswith("pydoc:topics/")]
    assert wheres[: len(topics)] == topics and all(where.startswith("docstrings:") for where in wheres[len(topics) :])


def test_builtin_caps_cut_a_prefix():
    capped = [r for r in iter_documents("builtin:prose?max_mb=0.2") if r.text is not None]
    assert 0 < sum(len(r.text.encode()) for r in capped) <= 200_000
    assert [r.where for r in capped] == [r.where for r in iter_documents("builtin:prose?max_documents=400")][
        : len(capped)
    ]
    parts = expand_builtin("builtin:code?max_mb=3")
    sizes = [Path(path).stat().st_size for part in parts for _, path in part.files]
    assert sum(sizes) <= 3_000_000 < sum(sizes) + Path(code_files()[len(sizes)][1]).stat().st_size
    part_sizes = [sum(Path(path).stat().st_size for _, path in part.files) for part in parts]
    assert len(parts) >= 2 and all(size >= PART_BYTES for size in part_sizes[:-1])


def test_builtin_prose_prepares_with_its_counts_in_the_manifest(tmp_path, tokenizer):
    spec = "builtin:prose?max_documents=40"
    records = list(iter_documents(spec))
    texts = [r.text for r in records if r.text is not None]
    manifest = run([spec], tokenizer, tmp_path / "out", num_workers=2)
    (source,) = manifest["sources"]
    assert (source["input"], source["documents"]) == (spec, 40)
    assert source["bytes"] == sum(len(t.encode()) for t in texts)
    assert streamed(tmp_path / "out" / "train") == expected(tokenizer, texts)


def test_cli_subcommand_prepares_and_refuses_a_second_run(tmp_path, tokenizer, capfd):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    path = write_jsonl(tmp_path / "docs.jsonl", [{"t": f"{text} #{i}"} for i, text in enumerate(DOCUMENTS * 8)])
    other = tmp_path / "docs2.jsonl"  # the same records in a second file (one file named twice is refused)
    other.write_bytes(path.read_bytes())
    argv = ["prepare", "--input", str(path), "--input", str(other), "--tokenizer", str(tokenizer.path.parent)]
    argv += ["--output", str(tmp_path / "out"), "--text_key", "t", "--num_workers", "1", "--val_fraction", "0.3"]
    args = parser.parse_args(argv)
    args.run(args)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["documents"] == 80 and len(manifest["sources"]) == 2
    printed = capfd.readouterr()
    assert f"fingerprint {manifest['fingerprint']}" in printed.out
    assert "prepare: 2/2 sources, 80 documents, " in printed.err
    with pytest.raises(SystemExit, match=r"^prepare: error: .* already holds a prepared dataset; pass --overwrite"):
        args.run(args)


@pytest.mark.slow
def test_spawned_workers_write_the_same_dataset_as_forked_ones(tmp_path, tokenizer):
    """macOS and Windows have no fork: the spawn path pickles the sources and the tokenizer (about 8 s)."""
    spec = "builtin:prose?max_documents=30"
    forked = run([spec], tokenizer, tmp_path / "fork", num_workers=2, val_fraction=0.1)
    spawned = run([spec], tokenizer, tmp_path / "spawn", num_workers=2, val_fraction=0.1, start_method="spawn")
    assert spawned["fingerprint"] == forked["fingerprint"]
    (source,) = forked["sources"]
    assert source["sha256"] == corpus_fingerprint(spec)["sha256"] and source["python"] == platform.python_version()
    assert streamed(tmp_path / "spawn" / "val") == streamed(tmp_path / "fork" / "val")


def test_builtin_local_is_the_code_and_the_prose_corpus():
    from moxin_lightning.data.sources import expand_input

    local = expand_input("builtin:local?max_documents=3")
    code, prose = expand_input("builtin:code?max_documents=3"), expand_input("builtin:prose?max_documents=3")
    assert [part.path for part in local] == [part.path for part in code + prose]


def test_the_manifest_names_a_builtin_corpus_by_its_fingerprint(tmp_path, tokenizer):
    spec = "builtin:code?max_documents=12"
    manifest = run([spec], tokenizer, tmp_path / "out", num_workers=1, val_fraction=0)
    (source,) = manifest["sources"]
    fingerprint = corpus_fingerprint(spec)
    assert (source["sha256"], source["documents"], source["python"]) == (
        fingerprint["sha256"], fingerprint["documents"], fingerprint["python"],
    )  # fmt: skip


def test_the_builtin_corpus_does_not_depend_on_installed_packages(tmp_path):
    """Another environment with one more package (its source and its metadata on the path) reads the same
    corpus: the fingerprint of `builtin:local` is the same, and the extra package is visible to that process."""
    extra = tmp_path / "site"
    (extra / "extra_pkg").mkdir(parents=True)
    (extra / "extra_pkg" / "__init__.py").write_text('"""A package only this environment has."""\nVALUE = 1\n')
    (extra / "extra_pkg-1.0.dist-info").mkdir()
    (extra / "extra_pkg-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: aaa-extra-pkg\nVersion: 1.0\nSummary: A package only this environment has\n"
    )
    probe = (
        "import importlib.metadata, json, site, sys; site.addsitedir(sys.argv[1]) if sys.argv[1] else None;"
        "from moxin_lightning.data.builtin import corpus_fingerprint;"
        "print(json.dumps([corpus_fingerprint('builtin:local?max_documents=200'),"
        " any(d.metadata['Name'] == 'aaa-extra-pkg' for d in importlib.metadata.distributions())]))"
    )

    def fingerprint(site_dir: str) -> list:
        done = subprocess.run([sys.executable, "-c", probe, site_dir], capture_output=True, text=True, check=True)
        return json.loads(done.stdout)

    (plain, plain_sees), (extended, extended_sees) = fingerprint(""), fingerprint(str(extra))
    assert (plain_sees, extended_sees) == (False, True)
    assert extended == plain and plain["python"] == platform.python_version() and plain["documents"] > 300
