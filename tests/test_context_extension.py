"""ContextExtension: the switch lands on the scheduled optimizer step, keeps tokens per step, loses no token,
changes RoPE theta with it, survives resume, and refuses bad schedules before training."""

from __future__ import annotations

import csv
from dataclasses import dataclass

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from moxin_lightning.callbacks.context_extension import ContextExtension
from moxin_lightning.datamodules.pretrain import PretrainData
from moxin_lightning.model import ModelConfig, Transformer
from tests.prepared_data import stream_of, write_dataset

SEQ_LEN, BATCH_SIZE = 16, 4  # 64 tokens per micro-batch
SCHEDULE = {3: {"seq_len": 32, "rope_theta": 50_000.0}, 6: 64}
MAX_STEPS = 8
SHAPES = [(4, 16)] * 3 + [(2, 32)] * 3 + [(1, 64)] * 2  # (rows, seq_len) of each optimizer step
THETAS = [10_000.0] * 3 + [50_000.0] * 5  # theta carries on past the entry at step 6, which sets none


@dataclass
class Seen:
    step: int
    input_ids: torch.Tensor
    labels: torch.Tensor
    rope_theta: float


class StandInTask(L.LightningModule):
    """The task interface ContextExtension uses (model_config, set_rope_theta) around a tiny Transformer."""

    def __init__(self, max_seq_len: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Transformer(
            ModelConfig.from_name(
                "moxin-tiny-9m", vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                ffn_dim=64, max_seq_len=max_seq_len, sliding_window=None, rope_theta=10_000.0,
            )
        )  # fmt: skip
        self.seen: list[Seen] = []

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config

    def set_rope_theta(self, theta: float) -> None:
        self.model.config = self.model.config.replace(rope_theta=theta)

    def training_step(self, batch, batch_idx):
        seen = Seen(self.trainer.global_step, batch["input_ids"].clone(), batch["labels"].clone(), 0.0)
        seen.rope_theta = self.model.config.rope_theta  # the theta this forward uses
        self.seen.append(seen)
        loss_sum, count = self.model(batch["input_ids"], doc_ids=batch["doc_ids"], targets=batch["labels"])
        return loss_sum / count

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("prepared"), 0, 300, val_count=4)


def fit(dataset, root, schedule=SCHEDULE, accumulate=1, ckpt_path=None, task=None):
    data = PretrainData([str(dataset)], seq_len=SEQ_LEN, batch_size=BATCH_SIZE, shuffle=False, docs_per_read=8)
    task = task or StandInTask()
    trainer = L.Trainer(
        max_steps=MAX_STEPS, accumulate_grad_batches=accumulate, accelerator="cpu", devices=1,
        logger=CSVLogger(root, name="logs", version=0), log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[
            ContextExtension(schedule),
            ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}"),
        ],
    )  # fmt: skip
    trainer.fit(task, datamodule=data, ckpt_path=ckpt_path)
    return task, trainer


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    """One run with the schedule and no gradient accumulation, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("uninterrupted")
    task, trainer = fit(dataset, root)
    return task, trainer, root


def per_step(seen: list[Seen], field: str) -> list:
    """`field` of each optimizer step, checking that its micro-batches agree."""
    steps: dict[int, set] = {}
    for s in seen:
        value = tuple(s.input_ids.shape) if field == "shape" else getattr(s, field)
        steps.setdefault(s.step, set()).add(value)
    assert all(len(values) == 1 for values in steps.values()), steps
    return [values.pop() for _, values in sorted(steps.items())]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_switch_lands_on_the_scheduled_step_with_constant_tokens(dataset, tmp_path, uninterrupted, accumulate):
    task = uninterrupted[0] if accumulate == 1 else fit(dataset, tmp_path, accumulate=accumulate)[0]
    assert [s.step for s in task.seen] == [step for step in range(MAX_STEPS) for _ in range(accumulate)]
    assert per_step(task.seen, "shape") == SHAPES
    assert {rows * seq_len for rows, seq_len in SHAPES} == {BATCH_SIZE * SEQ_LEN}
    assert per_step(task.seen, "rope_theta") == THETAS


def test_no_token_is_lost_or_repeated_across_the_switches(dataset, uninterrupted):
    task = uninterrupted[0]
    inputs = torch.cat([s.input_ids.flatten() for s in task.seen]).numpy()
    labels = torch.cat([s.labels.flatten() for s in task.seen]).numpy()
    stream = stream_of(dataset)
    assert len(inputs) == MAX_STEPS * BATCH_SIZE * SEQ_LEN
    assert np.array_equal(inputs, stream[: len(inputs)])
    # Each label is the next token of the stream (rows overlap by one), masked where a document begins (BOS=1).
    following = stream[1 : len(inputs) + 1]
    assert np.array_equal(labels, np.where(following == 1, -100, following))


def test_rope_theta_and_the_logged_seq_len_change_at_the_switch(uninterrupted):
    task, trainer, root = uninterrupted
    assert task.model_config.rope_theta == 50_000.0
    with open(root / "logs" / "version_0" / "metrics.csv") as handle:
        logged = [float(row["train/seq_len"]) for row in csv.DictReader(handle) if row.get("train/seq_len")]
    assert logged == [float(seq_len) for _, seq_len in SHAPES]
    assert trainer.datamodule.seq_len == 64 and trainer.datamodule.batch_size == 1


@pytest.mark.parametrize("resume_step", [3, 4])  # at the switch boundary, and inside the extended phase
def test_resume_after_the_switch_continues_with_the_extended_batches(dataset, tmp_path, uninterrupted, resume_step):
    task, _, root = uninterrupted
    ckpt = root / "ckpt" / f"step={resume_step}.ckpt"
    resumed, _ = fit(dataset, tmp_path, ckpt_path=str(ckpt))
    assert [s.step for s in resumed.seen] == list(range(resume_step, MAX_STEPS))
    assert per_step(resumed.seen, "shape") == SHAPES[resume_step:]
    assert per_step(resumed.seen, "rope_theta") == THETAS[resume_step:]
    expected = task.seen[resume_step:]
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(expected, resumed.seen, strict=True))
    assert all(torch.equal(a.labels, b.labels) for a, b in zip(expected, resumed.seen, strict=True))


@pytest.mark.parametrize(
    ("schedule", "max_seq_len", "message"),
    [
        ({3: 128}, 64, r"^ContextExtension step 3: seq_len=128 exceeds the model's max_seq_len=64; raise"),
        (
            {2: 48},
            64,
            r"^ContextExtension step 2: seq_len=48 does not divide the 64 tokens per batch \(batch_size=4 x "
            r"seq_len=16\), so the batch size would be 1.33333; pick a seq_len dividing 64",
        ),
    ],
)
def test_schedules_the_run_cannot_follow_fail_at_setup(dataset, tmp_path, schedule, max_seq_len, message):
    task = StandInTask(max_seq_len)
    with pytest.raises(ValueError, match=message) as error:
        fit(dataset, tmp_path, schedule=schedule, task=task)
    assert "\n" not in str(error.value)
    assert task.seen == []  # refused before the first batch


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({-1: 32}, r"^ContextExtension schedule step -1 must be an integer >= 0"),
        ({2: {"seq_len": 32, "theta": 1.0}}, r"^ContextExtension schedule entry 2: .* must be a seq_len or"),
        ({2: {"seq_len": 32, "rope_theta": -5.0}}, r"^ContextExtension schedule entry 2: rope_theta=-5.0 must be"),
        ({2: 0}, r"^ContextExtension schedule entry 2: seq_len=0 must be >= 1"),
    ],
)
def test_malformed_schedules_are_refused_when_built(schedule, message):
    with pytest.raises(ValueError, match=message) as error:
        ContextExtension(schedule)
    assert "\n" not in str(error.value)


def test_the_schedule_is_written_in_yaml_under_trainer_callbacks(tmp_path):
    from jsonargparse import ArgumentParser
    from lightning.pytorch.callbacks import Callback

    config = tmp_path / "trainer.yaml"
    config.write_text(
        "callbacks:\n"
        "  - class_path: moxin_lightning.callbacks.context_extension.ContextExtension\n"
        "    init_args:\n"
        "      schedule: {0: 2048, 1000: {seq_len: 4096, rope_theta: 500000.0}}\n"
    )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_argument("--callbacks", type=list[Callback])
    (callback,) = parser.instantiate(parser.parse_args(["--config", str(config)])).callbacks
    assert isinstance(callback, ContextExtension)
    assert callback.schedule == {0: {"seq_len": 2048}, 1000: {"seq_len": 4096, "rope_theta": 500000.0}}
    config.write_text(config.read_text().replace("rope_theta", "theta"))
    with pytest.raises(Exception, match="theta"):
        parser.parse_args(["--config", str(config)])
