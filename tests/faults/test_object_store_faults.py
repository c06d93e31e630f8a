"""Data on an object store is checked at setup like a local folder: a chunk object deleted or cut short after
prepare is named as such, before any step, instead of litdata's download retries (moto's S3 server on 127.0.0.1)."""

from __future__ import annotations

import pytest

from moxin_lightning.data.integrity import DataIntegrityError
from moxin_lightning.data.prepare import prepare
from moxin_lightning.data.remote import upload_folder
from moxin_lightning.datamodules import ChatData, PretrainData
from tests.prepared_data import write_dataset
from tests.s3_server import s3_fixture  # noqa: F401  (the `s3` fixture)
from tests.test_instruct_resume import tokenizer  # noqa: F401  (a fixture)

FIX = "prepare it again (python -m moxin_lightning prepare ... --overwrite)"


def first_chunk(s3, prefix: str, split: str = "train") -> str:  # noqa: F811
    return next(key for key in s3.keys(prefix) if key.startswith(f"{split}/chunk-"))


def test_pretraining_data_with_a_missing_or_cut_chunk_object_is_refused_at_setup(s3, tmp_path):  # noqa: F811
    local = write_dataset(tmp_path / "docs", 0, 300)
    url = s3.url("faults/docs")
    upload_folder(local, url)
    PretrainData([url], seq_len=16, batch_size=2).setup("fit")  # intact: accepted

    key = first_chunk(s3, "faults/docs")
    body = s3.client().get_object(Bucket=s3.bucket, Key=f"faults/docs/{key}")["Body"].read()
    s3.client().put_object(Bucket=s3.bucket, Key=f"faults/docs/{key}", Body=body[: len(body) // 2])
    with pytest.raises(DataIntegrityError) as cut:
        PretrainData([url], seq_len=16, batch_size=2).setup("fit")
    assert str(cut.value) == (
        f"dataset {url}: {key} is truncated ({len(body) // 2} bytes, index.json says {len(body)}); {FIX}"
    )
    s3.client().delete_object(Bucket=s3.bucket, Key=f"faults/docs/{key}")
    with pytest.raises(DataIntegrityError) as missing:
        PretrainData([url], seq_len=16, batch_size=2).setup("fit")
    assert str(missing.value) == f"dataset {url}: {key} is missing; {FIX}"


def test_instruction_data_with_a_missing_chunk_object_is_refused_at_setup(s3, tokenizer, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MOXIN_CACHE", str(tmp_path / "cache"))
    url = s3.url("faults/chat")
    prepare(["builtin-chat:arithmetic?count=20"], tokenizer, url, format="chat", max_length=256, val_fraction=0)
    key = first_chunk(s3, "faults/chat")
    s3.client().delete_object(Bucket=s3.bucket, Key=f"faults/chat/{key}")
    with pytest.raises(DataIntegrityError) as missing:
        ChatData([url], batch_size=2).setup("fit")
    assert str(missing.value) == f"dataset {url}: {key} is missing; {FIX}"
