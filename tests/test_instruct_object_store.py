"""Instruction data on an S3 API (moto's server on 127.0.0.1, tests/s3_server.py): `prepare --format chat` writes
to an `s3://` URL, ChatData streams it with the same batches as the local folder, the tokenizer it carries comes
with it, and a run resumed mid-epoch over S3 trains on the uninterrupted run's batches to bit-identical weights."""

from __future__ import annotations

import torch

from moxin_lightning.data import manifest
from moxin_lightning.data.prepare import prepare
from moxin_lightning.datamodules import ChatData
from tests.s3_server import s3_fixture  # noqa: F401  (the `s3` fixture)
from tests.test_instruct_resume import assert_resumes_exactly, tokenizer  # noqa: F401  (tokenizer: a fixture)


def test_chat_data_streams_the_same_batches_from_s3_as_from_the_folder(s3, tokenizer, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MOXIN_CACHE", str(tmp_path / "cache"))
    options = {"format": "chat", "max_length": 256, "val_fraction": 0.1, "num_workers": 1}
    local = prepare(["builtin-chat:arithmetic?count=60"], tokenizer, tmp_path / "chat", **options)
    url = s3.url("prepared/chat")
    assert prepare(["builtin-chat:arithmetic?count=60"], tokenizer, url, **options) == url
    assert manifest.read(url)["fingerprint"] == manifest.read(local)["fingerprint"]

    remote_data = ChatData([url], batch_size=4, shuffle=False)  # no tokenizer given: the one the data carries
    local_data = ChatData([str(local)], batch_size=4, shuffle=False)
    assert remote_data.tokenizer.fingerprint == tokenizer.fingerprint
    for loader in ("train_dataloader", "val_dataloader"):
        remote_batches = list(getattr(remote_data, loader)())
        local_batches = list(getattr(local_data, loader)())
        assert len(remote_batches) == len(local_batches) > 0, loader
        for ours, theirs in zip(remote_batches, local_batches, strict=True):
            assert all(torch.equal(ours[key], theirs[key]) for key in theirs), loader
    assert remote_data.summary() == local_data.summary()


def test_a_run_resumed_over_s3_continues_where_it_stopped(s3, tokenizer, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MOXIN_CACHE", str(tmp_path / "cache"))
    url = s3.url("prepared/resume")
    prepare(["builtin-chat:arithmetic?count=24"], tokenizer, url, format="chat", max_length=256, val_fraction=0)
    data = lambda: ChatData([url], batch_size=2, num_workers=1)  # noqa: E731
    assert len(data().train_dataloader()) == 12
    assert_resumes_exactly(data, 12, tmp_path)
