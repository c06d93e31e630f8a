"""Instruction data on an S3 API (moto's server on 127.0.0.1, tests/s3_server.py): `prepare --format chat` writes
to an `s3://` URL, ChatData streams it with the same batches as the local folder, the tokenizer it carries comes
with it, and a run resumed mid-epoch over S3 trains on the uninterrupted run's batches to bit-identical weights."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import ChatData
from moxin_lightning.data import manifest
from moxin_lightning.data.prepare import prepare
from moxin_lightning.tasks import SFT
from tests.s3_server import s3_fixture  # noqa: F401  (the `s3` fixture)
from tests.test_instruct_resume import TINY, Seen, tokenizer  # noqa: F401  (tokenizer: a fixture)


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
    steps = 12 + 3  # 12 batches an epoch: into the second

    def run(ckpt_path=None):
        seen = Seen()
        model = SFT(preset="moxin-tiny-9m", lr=1e-3, warmup_steps=1, model_overrides=TINY)
        trainer = L.Trainer(
            max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0,
            callbacks=[seen, ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)],
        )  # fmt: skip
        trainer.fit(model, datamodule=ChatData([url], batch_size=2, num_workers=1), ckpt_path=ckpt_path)
        return seen.batches, model

    uninterrupted, finished = run()
    resumed, again = run(tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    assert len(uninterrupted) == steps and len(resumed) == steps - 3
    assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[3:], strict=True))
    assert not torch.equal(uninterrupted[0], uninterrupted[12])  # the second epoch is in a new order
    for (name, weight), other in zip(finished.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(weight, other), name
