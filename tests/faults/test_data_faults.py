"""Data faults: nothing trains on bad data, and `prepare` fails in one line instead of hanging or duplicating.

Each case breaks a prepared dataset or a `prepare` run as a user (or a disk) would and checks, through the command
line (`python -m moxin_lightning fit | verify | prepare`), the exact message, the exit status and what is left.
`fit` runs in-process through `moxin_lightning.cli.main` (the entry point `python -m` calls), which keeps each case
to seconds; `prepare` under a file-size limit and the memory case run as real subprocesses.
"""

from __future__ import annotations

import importlib.resources
import inspect
import io
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from moxin_lightning.cli import main
from moxin_lightning.data import worker
from moxin_lightning.data.integrity import DataIntegrityError
from moxin_lightning.data.prepare import prepare
from moxin_lightning.tokenizers import SentencePieceTokenizer
from tests.prepared_data import TINY_PRETRAIN_MODEL, write_dataset

WORDS = "the quick brown fox jumps over the lazy dog while a tokenizer turns text into ids and back again".split()
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 5), model_writer=model,
        vocab_size=300, model_type="bpe", byte_fallback=True, hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0,
        minloglevel=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def write_jsonl(path: Path, count: int, words: int = 40, key: str = "text", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with path.open("w") as file:
        for _ in range(count):
            file.write(json.dumps({key: " ".join(rng.choice(WORDS, words))}) + "\n")
    return path


def cli(*words: str, cwd: Path, preexec_fn=None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moxin_lightning", *words],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    return lines[-1]


# -- fit verifies what it reads ----------------------------------------------------------------------------

TINY_FIT = """
{model}data:
  class_path: moxin_lightning.datamodules.PretrainData
  init_args:
    datasets: [{data}]
    seq_len: 32
    batch_size: 2
    val_batches: 0
trainer:
  default_root_dir: {root}
  accelerator: cpu
  devices: 1
  max_steps: 3
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
"""


def fit(tmp_path: Path, data: Path, capsys) -> tuple[int, str]:
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_FIT.format(model=TINY_PRETRAIN_MODEL, data=data, root=tmp_path / "run"))
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config)])
    return stop.value.code, error_line(capsys.readouterr().err)


@pytest.fixture()
def data(tmp_path) -> Path:
    return write_dataset(tmp_path / "data", 0, 60)


def test_fit_refuses_a_manifest_whose_token_count_differs_from_its_shards(tmp_path, data, capsys):
    manifest = json.loads((data / "manifest.json").read_text())
    real = manifest["splits"]["train"]["tokens"]
    manifest["splits"]["train"]["tokens"] = real + 5
    (data / "manifest.json").write_text(json.dumps(manifest))
    code, line = fit(tmp_path, data, capsys)
    assert code == 2
    assert line == (
        f"error: dataset {data}: train/the chunks hold {real} tokens but the manifest says {real + 5}; the manifest "
        "or the shards were changed after prepare: prepare it again (python -m moxin_lightning prepare ... --overwrite)"
    )
    assert not list(tmp_path.glob("run/**/*.ckpt"))  # stopped at setup: no step, no checkpoint


def test_fit_names_a_missing_and_a_truncated_chunk(tmp_path, data, capsys):
    chunk = data / "train" / "chunk-0-1.bin"
    size = chunk.stat().st_size
    chunk.write_bytes(chunk.read_bytes()[: size // 2])
    code, line = fit(tmp_path, data, capsys)
    assert code == 2
    assert line == (
        f"error: dataset {data}: train/chunk-0-1.bin is truncated ({size // 2} bytes, index.json says {size}); "
        "prepare it again (python -m moxin_lightning prepare ... --overwrite)"
    )
    chunk.unlink()
    code, line = fit(tmp_path, data, capsys)
    assert (code, line) == (
        2,
        f"error: dataset {data}: train/chunk-0-1.bin is missing; prepare it again (python -m moxin_lightning "
        "prepare ... --overwrite)",
    )


def test_fit_stops_on_token_ids_beyond_the_vocabulary_naming_the_chunk(tmp_path, data, capsys):
    chunk = data / "train" / "chunk-0-0.bin"
    raw = bytearray(chunk.read_bytes())
    count = int.from_bytes(raw[:4], "little")
    first = int.from_bytes(raw[4:8], "little")  # offset of document 0
    raw[first + 8 : first + 12] = (99_999).to_bytes(4, "little")  # document 0's third token: same size, bad id
    chunk.write_bytes(bytes(raw))
    assert count > 0
    code, line = fit(tmp_path, data, capsys)
    assert code == 2
    assert line == (
        f"error: dataset {data}: train/chunk-0-0.bin (document 0) holds token id 99999, outside the vocabulary of "
        f"200 (corrupted data); run python -m moxin_lightning verify {data}, then prepare it again "
        "(python -m moxin_lightning prepare ... --overwrite)"
    )


def test_a_bad_id_read_by_a_loader_worker_is_still_one_line(tmp_path, data, capsys):
    chunk = data / "train" / "chunk-0-0.bin"
    raw = bytearray(chunk.read_bytes())
    first = int.from_bytes(raw[4:8], "little")
    raw[first + 4 : first + 8] = (250).to_bytes(4, "little")
    chunk.write_bytes(bytes(raw))
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_FIT.format(model=TINY_PRETRAIN_MODEL, data=data, root=tmp_path / "run"))
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config), "--data.init_args.num_workers=1"])
    line = error_line(capsys.readouterr().err)
    assert stop.value.code == 2
    assert line.startswith(f"error: dataset {data}: train/chunk-0-0.bin (document 0) holds token id 250, outside")


# -- verify: content hashes --------------------------------------------------------------------------------


@pytest.fixture()
def prepared(tmp_path, tokenizer_path) -> Path:
    source = write_jsonl(tmp_path / "docs.jsonl", 120)
    out = tmp_path / "prepared"
    prepare([str(source)], tokenizer_path, out, num_workers=1, val_fraction=0.1, chunk_bytes="4KB")
    return out


def test_verify_rehashes_each_split_and_names_a_changed_chunk(tmp_path, prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    result = cli("verify", str(prepared), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert result.stdout.splitlines() == [
        f"{prepared} train: {train['documents']} documents, {train['tokens']} tokens; "
        f"{train['chunks']} chunks match their sha256",
        f"{prepared} val: {val['documents']} documents, {val['tokens']} tokens; "
        f"{val['chunks']} chunks match their sha256",
        f"verified {prepared}: fingerprint {manifest['fingerprint']}",
    ]
    assert train["chunks"] > 1
    chunk = prepared / "train" / "chunk-0-1.bin"
    raw = bytearray(chunk.read_bytes())
    raw[-4:] = (7).to_bytes(4, "little")  # a token id rewritten in place: every size and count still agrees
    chunk.write_bytes(bytes(raw))
    result = cli("verify", str(prepared), cwd=tmp_path)
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert line.startswith(f"error: dataset {prepared}: train/chunk-0-1.bin does not match the manifest's sha256 (")
    assert line.endswith(
        "): its bytes changed after prepare; prepare it again (python -m moxin_lightning prepare ... --overwrite)"
    )
    assert result.stdout == ""


def test_pretrain_data_verify_setting_refuses_a_changed_chunk(prepared):
    from moxin_lightning.datamodules.pretrain import PretrainData

    PretrainData([str(prepared)], verify=True, seq_len=16, batch_size=2).setup("fit")  # intact: passes
    chunk = prepared / "val" / "chunk-0-0.bin"
    raw = bytearray(chunk.read_bytes())
    raw[-4:] = (7).to_bytes(4, "little")
    chunk.write_bytes(bytes(raw))
    PretrainData([str(prepared)], seq_len=16, batch_size=2).setup("fit")  # the cheap checks cannot see it
    with pytest.raises(DataIntegrityError, match=r"^dataset .*prepared: val/chunk-0-0.bin does not match"):
        PretrainData([str(prepared)], verify=True, seq_len=16, batch_size=2).setup("fit")


def test_instruction_collate_refuses_ids_beyond_the_vocabulary():
    from moxin_lightning.datamodules.records import IdsChecked

    collate = IdsChecked(lambda items: items, 300, "data/sft", "train")
    good = {"ids": np.array([1, 5, 2], dtype=np.int32), "trained": np.array([0, 1, 1], dtype=np.uint8), "index": 3}
    assert collate([good]) == [good]
    bad = {**good, "ids": np.array([1, 300, 2], dtype=np.int32), "index": 4}
    with pytest.raises(DataIntegrityError) as error:
        collate([good, bad])
    assert str(error.value) == (
        "dataset data/sft: train record 4 (ids) holds token id 300, outside the vocabulary of 300 (corrupted data); "
        "run python -m moxin_lightning verify data/sft, then prepare it again "
        "(python -m moxin_lightning prepare ... --overwrite)"
    )


# -- prepare: inputs named twice, files without the text field ---------------------------------------------


def test_prepare_refuses_a_file_named_twice(tmp_path, tokenizer_path):
    source = write_jsonl(tmp_path / "docs.jsonl", 20)
    for inputs in ([str(source), str(source)], [str(tmp_path / "*.jsonl"), "docs.jsonl"]):
        words = [word for given in inputs for word in ("--input", given)]
        result = cli("prepare", *words, "--tokenizer", str(tokenizer_path), "--output", "out", cwd=tmp_path)
        assert result.returncode == 1
        assert error_line(result.stderr) == (
            f"prepare: error: --input {source} is listed twice; each file is read once, so pass it once"
        )
        assert sorted(path.name for path in tmp_path.iterdir()) == ["docs.jsonl"]


def test_prepare_warns_about_a_file_none_of_whose_records_has_the_text_field(tmp_path, tokenizer_path):
    good = write_jsonl(tmp_path / "a.jsonl", 30)
    other = write_jsonl(tmp_path / "b.jsonl", 12, key="content")
    result = cli(
        "prepare", "--input", str(good), "--input", str(other), "--tokenizer", str(tokenizer_path),
        "--output", "out", "--val_fraction", "0", "--num_workers", "1", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == [
        f"prepare: warning: {other}: all 12 records lack the text field 'text', so the file adds no documents; "
        "pass --text_key FIELD naming its text field"
    ]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["documents"] == 30


# -- prepare: a write error (disk full) fails in one line, leaving nothing ---------------------------------


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit raise EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_write_error_fails_prepare_in_one_line_and_removes_its_staging(tmp_path, tokenizer_path):
    source = write_jsonl(tmp_path / "docs.jsonl", 150, words=300)  # ~1 MB of int32 tokens in one chunk
    result = cli(
        "prepare", "--input", str(source), "--tokenizer", str(tokenizer_path), "--output", "out",
        "--num_workers", "1", cwd=tmp_path, preexec_fn=_file_size_limit(400_000), timeout=90,
    )  # fmt: skip
    assert result.returncode == 1
    assert error_line(result.stderr) == (
        "prepare: error: writing out failed: File too large (EFBIG); nothing was written there: make room on its "
        "file system (or lift the file-size limit) and run prepare again"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["docs.jsonl"]  # no staging folder, no output


# -- prepare: long documents in bounded memory -------------------------------------------------------------


def test_a_long_document_is_tokenized_in_pieces_equal_to_the_whole(tokenizer_path, monkeypatch):
    mistral = SentencePieceTokenizer(
        Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
    )
    code = inspect.getsource(worker) + inspect.getsource(json)
    prose = "  Naïve café, 世界 and 🚀.\n\nTwo  spaces,\ttabs and lines. The quick brown fox. " * 200
    monkeypatch.setattr(worker, "BATCH_CHARS", 3000)
    monkeypatch.setattr(worker, "PIECE_CHARS", 200)
    for tokenizer in (SentencePieceTokenizer(tokenizer_path), mistral):
        seen: list[int] = []
        encode_batch = tokenizer.encode_batch
        monkeypatch.setattr(
            tokenizer, "encode_batch", lambda texts, f=encode_batch, seen=seen: seen.extend(map(len, texts)) or f(texts)
        )
        for text in (code, prose, code + prose):
            seen.clear()
            pieces = worker.encode_long(tokenizer, text, frame=(1, 2))
            assert pieces.tolist() == [1, *tokenizer.encode(text), 2]
            assert len(seen) > 20 and max(seen) < 1000  # cut into pieces, none near the whole text


@pytest.mark.slow
def test_prepare_of_one_50_mb_line_peaks_under_its_bound(tmp_path, tokenizer_path):
    rng = np.random.default_rng(0)
    line = " ".join(rng.choice(WORDS, 12_000_000))[:50_000_000]
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": line}) + "\n")
    del line
    measure = (
        "import resource, subprocess, sys; "
        "r = subprocess.run([sys.executable, '-m', 'moxin_lightning', *sys.argv[1:]]); "
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    result = subprocess.run(
        [sys.executable, "-c", measure, "prepare", "--input", "long.jsonl", "--tokenizer", str(tokenizer_path),
         "--output", "out", "--num_workers", "1", "--val_fraction", "0"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    code, peak_kib = map(int, result.stdout.split()[-2:])
    tokens = json.loads((tmp_path / "out" / "manifest.json").read_text())["tokens"]
    assert code == 0, result.stderr
    # README: peak RSS <= 400 MB (the process: Python, torch, litdata) + 6x the document's int32 tokens
    assert peak_kib * 1024 < 400e6 + 6 * 4 * tokens, (peak_kib, tokens)
