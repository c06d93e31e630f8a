"""Prepared datasets on an S3 API: `prepare --output s3://...`, the manifest as commit marker, PretrainData streaming
and resuming from s3:// URLs, the tokenizer a remote dataset carries.

The store is moto's S3 server on 127.0.0.1 (tests/s3_server.py): boto3, s3fs and litdata's obstore downloads
speak HTTP to it exactly as to AWS, with the endpoint and fake credentials taken from the environment.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from moxin_lightning.data import is_validation, manifest
from moxin_lightning.data.prepare import prepare
from moxin_lightning.data.remote import check_remote_output, remote_holds_dataset, upload_folder
from moxin_lightning.datamodules.pretrain import PretrainData
from tests.prepared_data import stream_of, write_dataset, write_records
from tests.s3_server import BUCKET, s3_fixture, serve_s3  # noqa: F401  (s3_fixture: the `s3` fixture)
from tests.test_pretrain_data import fit, module, take

REPO = Path(__file__).resolve().parents[1]
TEXTS = [f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(60)]


def files_under(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import sentencepiece as spm

    from moxin_lightning.tokenizers import SentencePieceTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS * 3), model_writer=model, vocab_size=300, model_type="bpe", byte_fallback=True,
        hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return SentencePieceTokenizer(path)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    return write_dataset(root / "a", 0, 300), write_dataset(root / "b", 10_000, 300)


@pytest.fixture(scope="module")
def remote_dirs(s3, data_dirs):
    """The two test datasets uploaded to s3://BUCKET/mix/a and .../mix/b."""
    urls = [s3.url(f"mix/{folder.name}") for folder in data_dirs]
    for folder, url in zip(data_dirs, urls, strict=True):
        upload_folder(folder, url)
    return urls


def test_the_server_is_s3_on_loopback_and_the_environment_is_restored(tmp_path):
    before = dict(os.environ)
    with serve_s3(tmp_path) as server:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.endpoint)
        assert os.environ["AWS_ENDPOINT_URL"] == server.endpoint and os.environ["AWS_ACCESS_KEY_ID"] == "testing"
        port = int(server.endpoint.rsplit(":", 1)[1])
        assert server.bucket == f"{BUCKET}-{port}"
        assert server.bucket in [b["Name"] for b in server.client().list_buckets()["Buckets"]]
        server.client().put_object(Bucket=server.bucket, Key="x/y.txt", Body=b"hello")
        import fsspec

        assert fsspec.filesystem("s3").cat(f"{server.bucket}/x/y.txt") == b"hello"  # s3fs: through the environment
    assert dict(os.environ) == before
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # stopped


@contextmanager
def put_file_replaced(replacement):
    """s3fs's upload of one object replaced by `replacement(original)`; s3fs binds it when it makes a filesystem,
    so no cached filesystem may outlive the swap."""
    import s3fs

    original = s3fs.S3FileSystem._put_file
    s3fs.S3FileSystem._put_file = replacement(original)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        s3fs.S3FileSystem._put_file = original
        s3fs.S3FileSystem.clear_instance_cache()


def test_upload_sends_the_manifest_last_and_the_manifest_reads_back(s3, data_dirs):
    sent: list[str] = []

    def recording(put_file):
        async def put_and_record(self, lpath, rpath, *args, **kwargs):
            result = await put_file(self, lpath, rpath, *args, **kwargs)
            sent.append(rpath)
            return result

        return put_and_record

    url = s3.url("upload/a")
    with put_file_replaced(recording):
        upload_folder(data_dirs[0], url)
    keys = files_under(data_dirs[0])
    assert s3.keys("upload/a") == keys and {"manifest.json", "train/index.json", "val/index.json"} <= set(keys)
    for key in keys:
        body = s3.client().get_object(Bucket=s3.bucket, Key=f"upload/a/{key}")["Body"].read()
        assert body == (data_dirs[0] / key).read_bytes(), key
    assert len(sent) == len(keys) and sent[-1] == f"{s3.bucket}/upload/a/manifest.json"
    assert manifest.read(url) == json.loads((data_dirs[0] / "manifest.json").read_text())
    assert remote_holds_dataset(url) and not remote_holds_dataset(s3.url("upload/elsewhere"))
    missing = s3.url("upload/elsewhere")
    with pytest.raises(FileNotFoundError) as error:
        manifest.read(missing)
    assert str(error.value) == (
        f"no prepared dataset at {missing} (no manifest.json); make it with: "
        f"python -m moxin_lightning prepare --input ... --tokenizer ... --output {missing}"
    )


def test_an_interrupted_upload_is_no_dataset_and_is_replaced_only_with_overwrite(s3, data_dirs):
    def broken_at_the_manifest(put_file):
        async def put(self, lpath, rpath, *args, **kwargs):
            if rpath.endswith("/manifest.json"):
                raise ConnectionError("the network went away")
            return await put_file(self, lpath, rpath, *args, **kwargs)

        return put

    url = s3.url("interrupted")
    with put_file_replaced(broken_at_the_manifest), pytest.raises(ConnectionError, match="the network went away"):
        upload_folder(data_dirs[0], url)
    assert s3.keys("interrupted") == [key for key in files_under(data_dirs[0]) if key != "manifest.json"]
    assert not remote_holds_dataset(url)
    with pytest.raises(FileNotFoundError, match=f"no prepared dataset at {url} "):
        PretrainData([url], vocab_size=200).setup("fit")
    with pytest.raises(FileExistsError) as error:
        upload_folder(data_dirs[1], url)
    assert str(error.value) == (
        f"{url} holds objects but no manifest.json (another dataset's files, or an interrupted upload); "
        "pass --overwrite to replace them, or a new prefix"
    )
    upload_folder(data_dirs[1], url, overwrite=True)
    assert manifest.read(url)["fingerprint"] == "fp-10000-300"
    with pytest.raises(FileExistsError) as error:
        check_remote_output(url, overwrite=False)
    assert str(error.value) == f"{url} already holds a prepared dataset; pass --overwrite to replace it"


def test_prepare_to_s3_uploads_the_local_dataset_and_refuses_a_second_run(s3, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("MOXIN_CACHE", str(tmp_path / "cache"))
    first = write_records(tmp_path / "first.jsonl", [{"text": text} for text in TEXTS])
    second = write_records(tmp_path / "second.jsonl", [{"text": text.upper()} for text in TEXTS[:40]])
    options = {"num_workers": 1, "val_fraction": 0.2}
    local = prepare([first], tokenizer, tmp_path / "local", **options)
    url = s3.url("prepared/web")
    assert prepare([first], tokenizer, url, **options) == url
    expected = manifest.read(local)
    assert manifest.read(url)["fingerprint"] == expected["fingerprint"]
    assert manifest.read(url)["splits"] == expected["splits"]
    assert s3.keys("prepared/web") == files_under(local) and "tokenizer/tokenizer.model" in files_under(local)
    for key in [key for key in files_under(local) if key.endswith(".bin") or key.startswith("tokenizer/")]:
        body = s3.client().get_object(Bucket=s3.bucket, Key=f"prepared/web/{key}")["Body"].read()
        assert body == (local / key).read_bytes(), key  # the same shards and tokenizer as the local run's
    assert list((tmp_path / "cache" / "uploads").iterdir()) == []  # the local copy went once uploaded

    # refused before any work: the input does not exist, and the error is about the destination
    with pytest.raises(FileExistsError, match=f"^{url} already holds a prepared dataset; pass --overwrite"):
        prepare([str(tmp_path / "no-such-file.jsonl")], tokenizer, url, **options)
    replaced = prepare([second], tokenizer, url, overwrite=True, **options)
    again = manifest.read(prepare([second], tokenizer, tmp_path / "l2", **options))
    assert manifest.read(replaced)["fingerprint"] == again["fingerprint"] != expected["fingerprint"]
    assert s3.keys("prepared/web") == files_under(tmp_path / "l2")  # no object of the old dataset is left

    data = PretrainData([url], seq_len=16, batch_size=2, shuffle=False, docs_per_read=4)
    saved = data.tokenizer  # the tokenizer/ folder the data carries, downloaded into $MOXIN_CACHE
    assert saved.fingerprint == tokenizer.fingerprint
    assert Path(saved.path).is_relative_to(tmp_path / "cache" / "downloads")
    data.setup("fit")
    streamed = torch.cat([b["input_ids"].flatten() for b in take(iter(data.train_dataloader()), 4)]).tolist()
    train = [text.upper() for text in TEXTS[:40] if not is_validation(text.upper(), 0.2)]
    assert streamed == [tok for text in train for tok in tokenizer.encode(text, bos=True, eos=True)][: len(streamed)]


def test_prepare_reads_its_inputs_from_s3(s3, tokenizer, tmp_path):
    """`--input s3://bucket/corpus/*.jsonl`: the glob expands on the server, the workers read the objects."""
    client = s3.client()
    for part in range(3):
        lines = "".join(json.dumps({"text": text}) + "\n" for text in TEXTS[part * 20 : (part + 1) * 20])
        client.put_object(Bucket=s3.bucket, Key=f"corpus/part-{part}.jsonl", Body=lines.encode())
    client.put_object(Bucket=s3.bucket, Key="corpus/notes.txt", Body=b"not matched by the glob")
    pattern = s3.url("corpus/*.jsonl")
    made = manifest.read(prepare([pattern], tokenizer, tmp_path / "out", num_workers=2, val_fraction=0))
    assert [source["input"] for source in made["sources"]] == [pattern] * 3
    assert [source["path"] for source in made["sources"]] == [s3.url(f"corpus/part-{i}.jsonl") for i in range(3)]
    assert made["documents"] == len(TEXTS)
    expected = [token for text in TEXTS for token in tokenizer.encode(text, bos=True, eos=True)]
    assert stream_of(tmp_path / "out").tolist() == expected


def test_cli_prepares_to_s3_then_refuses_the_dataset_there_without_overwrite(s3, tokenizer, tmp_path):
    url = s3.url("cli/web")
    corpus = write_records(tmp_path / "docs.jsonl", [{"text": text} for text in TEXTS])
    command = [sys.executable, "-m", "moxin_lightning", "prepare", "--input", corpus, "--tokenizer"]
    command += [str(tokenizer.path), "--output", url, "--num_workers", "1", "--val_fraction", "0.2"]
    env = {**os.environ, "MOXIN_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    made = manifest.read(url)
    train, val = made["splits"]["train"], made["splits"]["val"]
    assert done.stdout == (
        f"prepared {url}: train {train['documents']:,} documents / {train['tokens']:,} tokens, "
        f"val {val['documents']:,} documents / {val['tokens']:,} tokens; fingerprint {made['fingerprint']}\n"
    )
    assert train["documents"] + val["documents"] == len(TEXTS)

    (tmp_path / "cache").rename(tmp_path / "first-cache")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    # prepare's own handler (prepare._run) turns its errors into SystemExit(message): exit status 1, not the 2
    # that moxin_lightning.errors.exit_with gives the other commands' errors
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"prepare: error: {url} already holds a prepared dataset; pass --overwrite to replace it"
    )
    assert done.stdout == "" and manifest.read(url) == made  # untouched
    assert not (tmp_path / "cache" / "uploads").exists()  # refused before anything was tokenized


def test_pretrain_data_streams_the_same_batches_from_s3_as_from_the_folder(data_dirs, remote_dirs):
    settings = dict(weights=[0.6, 0.4], shuffle=True, docs_per_read=4, val_batches=3)
    local, remote = module(data_dirs, **settings), module(remote_dirs, **settings)
    assert remote.fingerprint == local.fingerprint
    expected, got = take(iter(local.train_dataloader()), 12), take(iter(remote.train_dataloader()), 12)
    for a, b in zip(expected, got, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    local_val, remote_val = list(local.val_dataloader()), list(remote.val_dataloader())
    assert len(local_val) == len(remote_val) == 3
    for a, b in zip(local_val, remote_val, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)
    single = module(remote_dirs[:1])  # not shuffled: the batches are the dataset's token stream
    inputs = torch.cat([b["input_ids"].flatten() for b in take(iter(single.train_dataloader()), 10)]).numpy()
    assert np.array_equal(inputs, stream_of(data_dirs[0])[: len(inputs)])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_over_s3_gives_bitwise_the_same_next_batches(remote_dirs, workers):
    kwargs = dict(weights=[0.6, 0.4], shuffle=True, num_workers=workers, docs_per_read=4)
    stream = module(remote_dirs, **kwargs).train_dataloader()
    iterator = iter(stream)
    take(iterator, 7)
    state = stream.state_dict()
    expected = take(iterator, 6)
    resumed = module(remote_dirs, **kwargs).train_dataloader()
    resumed.load_state_dict(state)
    got = take(iter(resumed), 6)
    for a, b in zip(expected, got, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_lightning_checkpoint_resumes_the_s3_stream_exactly(remote_dirs, tmp_path):
    uninterrupted = fit(remote_dirs, tmp_path / "a", max_steps=7)
    resumed = fit(remote_dirs, tmp_path / "b", max_steps=7, ckpt_path=str(tmp_path / "a" / "step=3.ckpt"))
    assert len(uninterrupted) == 7 and len(resumed) == 4
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[3:], resumed, strict=True))


@pytest.mark.slow
def test_sigkill_then_resume_over_s3_gives_the_uninterrupted_weights(s3, data_dirs, tmp_path):
    """tests/test_resume.py's killed-and-resumed run through the command line, the data streamed from S3: the
    resumed run ends with the uninterrupted run's weights, bit for bit."""
    import signal

    from tests.test_resume import EVERY, assert_continues, check, record, run_config
    from tests.test_resume import fit as fit_cli

    url = s3.url("resume/a")
    upload_folder(data_dirs[0], url)
    check(fit_cli(run_config(tmp_path / "a", url, [record(tmp_path / "a.pt")])))
    uninterrupted = torch.load(tmp_path / "a.pt", weights_only=True)

    killed = {"class_path": "tests.run_callbacks.KillAtStep", "init_args": {"step": 5}}
    check(fit_cli(run_config(tmp_path / "b", url, [killed])), returncode=-signal.SIGKILL)
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == EVERY
    check(fit_cli(run_config(tmp_path / "b", url, [record(tmp_path / "b.pt")]), "--ckpt_path", str(last)))
    assert_continues(torch.load(tmp_path / "b.pt", weights_only=True), uninterrupted, from_step=EVERY)
