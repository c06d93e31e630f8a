"""PretrainData: the packed token stream, mixture, seq_len switches, exact resume and refusals."""

import json

import numpy as np
import pytest
import torch

from moxin_lightning.datamodules.pretrain import PretrainData
from tests.prepared_data import stream_of, write_dataset


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    return write_dataset(root / "a", 0, 300), write_dataset(root / "b", 10_000, 300)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def module(dirs, **kwargs):
    settings = dict(seq_len=16, batch_size=2, num_workers=0, shuffle=False, docs_per_read=8, vocab_size=200)
    data = PretrainData([str(d) for d in dirs], **{**settings, **kwargs})
    data.setup("fit")
    return data


def test_batches_are_the_dataset_token_stream(data_dirs):
    data = module(data_dirs[:1])
    batches = take(iter(data.train_dataloader()), 10)
    inputs = torch.cat([b["input_ids"].flatten() for b in batches]).numpy()
    assert np.array_equal(inputs, stream_of(data_dirs[0])[: len(inputs)])
    assert batches[0]["input_ids"].shape == (2, 16) and batches[0]["labels"].shape == (2, 16)


def test_set_seq_len_mid_stream_skips_and_repeats_nothing(data_dirs):
    data = module(data_dirs[:1])
    iterator = iter(data.train_dataloader())
    seen = take(iterator, 3)
    data.set_seq_len(40)
    seen += take(iterator, 3)
    data.set_seq_len(8)
    seen += take(iterator, 2)
    assert [b["input_ids"].shape[1] for b in seen] == [16] * 3 + [40] * 3 + [8] * 2
    inputs = torch.cat([b["input_ids"].flatten() for b in seen]).numpy()
    assert np.array_equal(inputs, stream_of(data_dirs[0])[: len(inputs)])


def test_mixture_follows_the_weights(data_dirs):
    data = module(data_dirs, weights=[3.0, 1.0], docs_per_read=1, shuffle=True)
    tokens = torch.cat([b["input_ids"].flatten() for b in take(iter(data.train_dataloader()), 1000)])
    first_body_tokens = tokens[1:][tokens[:-1] == 1]  # the token after each BOS tells the document's dataset
    share_a = (first_body_tokens < 100).float().mean().item()
    assert len(first_body_tokens) > 500 and 0.69 < share_a < 0.81  # 3:1 by documents


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_bitwise_the_same_next_batches(data_dirs, workers):
    kwargs = dict(weights=[0.6, 0.4], shuffle=True, num_workers=workers, docs_per_read=4)
    data = module(data_dirs, **kwargs)
    stream = data.train_dataloader()
    iterator = iter(stream)
    take(iterator, 7)
    state = stream.state_dict()
    expected = take(iterator, 6)
    resumed = module(data_dirs, **kwargs).train_dataloader()
    resumed.load_state_dict(state)
    got = take(iter(resumed), 6)
    for a, b in zip(expected, got, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_long_run_passes_over_the_data_more_than_once(data_dirs):
    data = module(data_dirs[:1], seq_len=64, batch_size=4)
    total_tokens = data.manifests[0]["splits"]["train"]["tokens"]
    batches = 2 * total_tokens // (64 * 4) + 1
    assert len(take(iter(data.train_dataloader()), batches)) == batches


def test_validation_is_the_held_out_split_and_repeatable(data_dirs):
    data = module(data_dirs[:1], val_batches=3)
    first, second = data.val_dataloader(), data.val_dataloader()
    assert len(first) == 3
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second, strict=True))
    inputs = torch.cat([b["input_ids"].flatten() for b in first]).numpy()
    assert np.array_equal(inputs, stream_of(data_dirs[0], "val")[: len(inputs)])


def test_validation_mixes_every_dataset_in_proportion_document_by_document(data_dirs):
    """Two datasets weighted 3:1, whose held-out splits (20 documents each) are smaller than one read of
    `docs_per_read` documents: validation still scores both, in about the weights' proportion."""
    data = module(data_dirs, weights=[0.75, 0.25], val_batches=6, docs_per_read=64)
    body = torch.cat([b["input_ids"].flatten() for b in data.val_dataloader()])
    body = body[body > 2]  # the documents' bodies: A's ids are 3..99, B's 100..199
    share_a = float((body < 100).float().mean())
    assert 0.6 < share_a < 0.9, share_a
    bodies = [stream_of(folder, "val") for folder in data_dirs]
    assert set(body.tolist()) <= set(np.concatenate(bodies).tolist())


def test_a_held_out_split_shorter_than_one_batch_is_a_one_line_error(data_dirs):
    data = module(data_dirs[:1], seq_len=64, batch_size=64)  # 4,097 tokens per batch; the split holds far fewer
    held_out = data.manifests[0]["splits"]["val"]["tokens"]
    with pytest.raises(ValueError) as error:
        data.val_dataloader()
    assert str(error.value) == (
        f"the held-out splits hold {held_out} tokens, less than one validation batch of 64 x 64; prepare the data "
        "with a larger --val_fraction, or set data.val_batches=0 for no validation"
    )
    assert len(module(data_dirs[:1], seq_len=64, batch_size=64, val_batches=0).val_dataloader()) == 0


def test_refusals_are_one_line_errors(data_dirs, tmp_path):
    with pytest.raises(
        FileNotFoundError, match="no prepared dataset at .*missing .*; make it with: python -m moxin_lightning prepare"
    ):
        module([tmp_path / "missing"])
    with pytest.raises(ValueError, match="tokenizer has 200 tokens but the model's vocab_size is 150"):
        module(data_dirs[:1], vocab_size=150)
    with pytest.raises(ValueError, match="seq_len=4096 exceeds the model's max_seq_len=2048"):
        module(data_dirs[:1], seq_len=4096, max_seq_len=2048)
    data = module(data_dirs[:1], max_seq_len=64)
    with pytest.raises(ValueError, match="seq_len=65 exceeds"):
        data.set_seq_len(65)
    state = module(data_dirs[:1]).train_dataloader().state_dict()
    other = module(data_dirs[1:]).train_dataloader()
    with pytest.raises(ValueError, match="the checkpoint was trained on data .* but the configured datasets are"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="weights \\[1.0\\] must be 2 non-negative numbers"):
        PretrainData([str(d) for d in data_dirs], weights=[1.0])


class RecordingModule:
    """A LightningModule that trains one scalar on each batch and remembers the batches it saw."""

    @staticmethod
    def build():
        import lightning as L

        class Recorder(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.zeros(()))
                self.seen = []

            def training_step(self, batch, batch_idx):
                self.seen.append(batch["input_ids"].clone())
                return (self.weight - batch["input_ids"].float().mean()) ** 2

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=1e-3)

        return Recorder()


def fit(data_dirs, root, max_steps, ckpt_path=None, workers=0):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = PretrainData([str(d) for d in data_dirs], weights=[0.5, 0.5], seq_len=16, batch_size=2, num_workers=workers)
    model = RecordingModule.build()
    checkpoints = ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[checkpoints], num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model.seen


def test_lightning_checkpoint_resumes_the_stream_exactly(data_dirs, tmp_path):
    uninterrupted = fit(data_dirs, tmp_path / "a", max_steps=7)
    resumed = fit(data_dirs, tmp_path / "b", max_steps=7, ckpt_path=str(tmp_path / "a" / "step=3.ckpt"))
    assert len(uninterrupted) == 7 and len(resumed) == 4
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[3:], resumed, strict=True))


def test_datasets_without_a_held_out_split_have_no_validation(data_dirs, tmp_path):
    import shutil

    copy = tmp_path / "no-val"
    shutil.copytree(data_dirs[0], copy)
    shutil.rmtree(copy / "val")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"].pop("val")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert len(module([copy]).val_dataloader()) == 0
    mixed = module([copy, data_dirs[1]], val_batches=2).val_dataloader()
    body = torch.cat([b["input_ids"].flatten() for b in mixed])
    assert len(mixed) == 2 and bool(((body < 3) | (body >= 100)).all())  # only dataset B's held-out documents


def test_manifests_are_read_from_object_store_urls(data_dirs):
    """Remote datasets (s3://, gs://, ...) are read through fsspec; the in-memory store stands in for one here."""
    import fsspec

    from moxin_lightning.data import manifest

    local = data_dirs[0] / "manifest.json"
    fsspec.filesystem("memory").pipe("/bucket/a/manifest.json", local.read_bytes())
    assert manifest.read("memory://bucket/a") == json.loads(local.read_text())
    with pytest.raises(
        FileNotFoundError, match="no prepared dataset at memory://bucket/b .* --output memory://bucket/b"
    ):
        manifest.read("memory://bucket/b")
