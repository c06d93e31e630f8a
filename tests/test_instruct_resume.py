"""Instruction data streamed from a prepared folder resumes mid-epoch exactly: a run checkpointed at step 3 of the
first epoch and resumed trains on the batches of the uninterrupted run (the rest of that epoch, then the next,
reshuffled) and ends with bit-identical weights; with loader workers too."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from moxin_lightning.data.builtin_chat import pydoc_sections
from moxin_lightning.data.prepare import prepare
from moxin_lightning.datamodules import ChatData
from moxin_lightning.tasks import SFT
from moxin_lightning.tokenizers import SentencePieceTokenizer, train_tokenizer

TINY = dict(vocab_size=512, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    texts = [section.body for section in pydoc_sections()[:60]] + ["<|system|>\n<|user|>\n<|assistant|>\n"] * 20
    folder = train_tokenizer(iter(texts), 400, tmp_path_factory.mktemp("tokenizer"), progress=False, minloglevel=2)
    return SentencePieceTokenizer(folder)


@pytest.fixture(scope="module")
def prepared(tokenizer, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("prepared") / "chat"
    prepare(["builtin-chat:arithmetic?count=40"], tokenizer, folder, format="chat", max_length=256, val_fraction=0)
    return str(folder)


class Seen(Callback):
    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.batches.append(batch["input_ids"].clone())


def assert_resumes_exactly(make_data, per_epoch: int, tmp_path) -> None:
    """Train `per_epoch + 3` steps on `make_data()`, then again from the step-3 checkpoint: the resumed run sees the
    uninterrupted run's batches from step 3 on (the rest of epoch 0, then epoch 1, reshuffled) and ends with
    bit-identical weights."""
    steps = per_epoch + 3  # into the second epoch

    def run(ckpt_path=None):
        seen = Seen()
        model = SFT(preset="moxin-tiny-9m", lr=1e-3, warmup_steps=1, model_overrides=TINY)
        trainer = L.Trainer(
            max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0,
            callbacks=[seen, ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)],
        )  # fmt: skip
        trainer.fit(model, datamodule=make_data(), ckpt_path=ckpt_path)
        return seen.batches, model

    uninterrupted, finished = run()
    resumed, again = run(tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    assert len(uninterrupted) == steps and len(resumed) == steps - 3
    assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[3:], strict=True))
    assert not torch.equal(uninterrupted[0], uninterrupted[per_epoch])  # the second epoch is in a new order
    for (name, weight), other in zip(finished.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(weight, other), name


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_run_resumed_mid_epoch_continues_the_epoch_where_it_stopped(prepared, tmp_path, num_workers):
    def data() -> ChatData:
        return ChatData([prepared], batch_size=2, num_workers=num_workers)

    per_epoch = len(data().train_dataloader())
    assert per_epoch == 20
    assert_resumes_exactly(data, per_epoch, tmp_path)
