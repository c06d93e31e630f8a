"""TrainingSpeed (tokens/s, MFU, tokens seen), the step progress bar and the peak-FLOPs helpers.

Steps run on a fake clock that the stand-in module advances by a chosen number of seconds per step, so every
logged rate is checked against exact arithmetic.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from moxin_lightning import flops
from moxin_lightning.callbacks.progress import StepProgressBar
from moxin_lightning.callbacks.throughput import TrainingSpeed
from moxin_lightning.losses import linear_cross_entropy
from moxin_lightning.model import ModelConfig, Transformer

CONFIG = ModelConfig.from_name(
    "moxin-tiny-9m", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
    max_seq_len=256, sliding_window=64,
)  # fmt: skip
BATCH, SEQ = 2, 16
PEAK = 1e12  # FLOP/s per device given to the callback (above what the CPU reaches: MFU stays below 100%)


class FakeClock:
    """Seconds that pass only when the stand-in module says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SpeedProbe(pl.LightningModule):
    """Stand-in for a moxin_lightning task: a tiny Transformer, `model_config`, "train/loss".

    Each optimizer step moves `clock` on by `step_seconds[global_step]` (split over the micro-batches);
    each validation batch by `validation_seconds`.
    """

    def __init__(
        self, clock: FakeClock | None = None, step_seconds: tuple[float, ...] = (1.0,), validation_seconds: float = 0
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Transformer(CONFIG)
        self.clock, self.step_seconds, self.validation_seconds = clock, step_seconds, validation_seconds

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.clock is not None:
            seconds = self.step_seconds[min(self.trainer.global_step, len(self.step_seconds) - 1)]
            self.clock.now += seconds / self.trainer.accumulate_grad_batches
        hidden = self.model.hidden_states(batch["input_ids"])
        loss_sum, count = linear_cross_entropy(hidden[:, :-1], self.model.lm_head.weight, batch["labels"][:, 1:])
        loss = loss_sum / count
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.clock is not None:
            self.clock.now += self.validation_seconds

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, rows: int, seq: int = SEQ) -> None:
        self.ids = torch.randint(0, CONFIG.vocab_size, (rows, seq), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def loader(rows: int = 64, seq: int = SEQ) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(RandomTokens(rows, seq), batch_size=BATCH)


def make_trainer(root: Path, callbacks: list, max_steps: int, **overrides) -> pl.Trainer:
    settings = dict(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=CSVLogger(root, name="csv", version=0),
        log_every_n_steps=1, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=root, callbacks=callbacks,
    )  # fmt: skip
    return pl.Trainer(**{**settings, **overrides})


def logged_rows(root: Path) -> list[dict[str, float]]:
    """The CSVLogger rows that carry the speed figures, as floats."""
    with open(root / "csv" / "version_0" / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/tokens_seen")]
    return [{key: float(value) for key, value in row.items() if value} for row in rows]


def with_clock(callback: TrainingSpeed, clock: FakeClock) -> TrainingSpeed:
    callback.clock = clock
    return callback


def test_tokens_seen_rate_and_mfu_are_exact(tmp_path):
    clock = FakeClock()
    speed = with_clock(TrainingSpeed(window=2, peak_flops=PEAK), clock)
    module = SpeedProbe(clock, step_seconds=(1.0, 2.0, 3.0))
    make_trainer(tmp_path, [speed], max_steps=3, accumulate_grad_batches=2).fit(module, loader())

    per_step = 2 * BATCH * SEQ  # accumulation * batch * sequence
    rows = logged_rows(tmp_path)
    assert [row["train/tokens_seen"] for row in rows] == [per_step, 2 * per_step, 3 * per_step]
    # Clock at each step: 0 (start), 1, 3, 6. Window of 2 steps: step 3 averages steps 2 and 3 only.
    assert [row["train/tokens_per_s"] for row in rows] == [per_step / 1, 2 * per_step / 3, 2 * per_step / 5]
    flops_per_token = CONFIG.flops_per_token(SEQ)
    for row in rows:
        assert row["train/mfu"] == pytest.approx(row["train/tokens_per_s"] * flops_per_token / PEAK, rel=1e-12)
    assert speed.tokens_seen == 3 * per_step


def test_validation_time_is_not_training_time(tmp_path):
    clock = FakeClock()
    speed = with_clock(TrainingSpeed(window=20, peak_flops=PEAK), clock)
    module = SpeedProbe(clock, step_seconds=(0.5,), validation_seconds=100.0)
    trainer = make_trainer(tmp_path, [speed], max_steps=4, limit_val_batches=1, val_check_interval=2)
    trainer.fit(module, loader(), loader(rows=4))

    assert clock.now == 4 * 0.5 + 2 * 100.0  # validation did run, twice
    assert [row["train/tokens_per_s"] for row in logged_rows(tmp_path)] == [BATCH * SEQ / 0.5] * 4


def test_tokens_seen_continues_after_resume(tmp_path):
    per_step = BATCH * SEQ
    first = TrainingSpeed(peak_flops=PEAK)
    trainer = make_trainer(tmp_path / "a", [first], max_steps=3)
    trainer.fit(SpeedProbe(), loader())
    checkpoint = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(checkpoint)
    assert torch.load(checkpoint, weights_only=True)["callbacks"]["TrainingSpeed"] == {"tokens_seen": 3 * per_step}

    resumed = TrainingSpeed(peak_flops=PEAK)
    make_trainer(tmp_path / "b", [resumed], max_steps=5).fit(SpeedProbe(), loader(), ckpt_path=checkpoint)
    assert resumed.tokens_seen == 5 * per_step
    assert [row["train/tokens_seen"] for row in logged_rows(tmp_path / "b")] == [4 * per_step, 5 * per_step]


def test_a_cpu_gets_no_mfu_unless_a_peak_is_given(tmp_path, caplog):
    speed = TrainingSpeed()
    with caplog.at_level(logging.INFO):
        make_trainer(tmp_path, [speed], max_steps=2).fit(SpeedProbe(), loader())
    assert speed.peak_flops is None
    assert "TrainingSpeed: no MFU on a CPU (no trustworthy peak); set peak_flops to report one" in caplog.messages
    rows = logged_rows(tmp_path)
    assert len(rows) == 2 and all("train/mfu" not in row and row["train/tokens_per_s"] > 0 for row in rows)


def test_an_mfu_above_100_percent_is_never_logged(tmp_path):
    """A peak far below what the model computes (here 1 FLOP/s): a warning, and no MFU from then on."""
    clock = FakeClock()
    speed = with_clock(TrainingSpeed(window=2, peak_flops=1.0), clock)
    with pytest.warns(UserWarning, match=r"so that peak is wrong; MFU is no longer reported"):
        make_trainer(tmp_path, [speed], max_steps=3).fit(SpeedProbe(clock, step_seconds=(1.0,)), loader())
    rows = logged_rows(tmp_path)
    assert [row["train/tokens_per_s"] for row in rows] == [BATCH * SEQ / 1.0] * 3
    assert all("train/mfu" not in row for row in rows) and speed.peak_flops is None


def test_the_cpu_matmul_peak_is_measured_in_the_training_dtype():
    measured = flops.peak_flops("cpu", torch.bfloat16)  # what bench/pretrain.py compares against
    assert measured.source == f"measured torch.bfloat16 matmul on cpu ({torch.get_num_threads()} threads)"
    assert measured.flops > 1e8


def test_bad_settings_and_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="window=0 must be >= 1"):
        TrainingSpeed(window=0)
    with pytest.raises(ValueError, match="peak_flops=-1.0 must be > 0"):
        TrainingSpeed(peak_flops=-1.0)

    class NoConfig(SpeedProbe):
        model_config = None

    with pytest.raises(TypeError, match=r"TrainingSpeed needs `NoConfig.model_config` \(a ModelConfig\)"):
        make_trainer(tmp_path, [TrainingSpeed(peak_flops=PEAK)], max_steps=1).fit(NoConfig(), loader())

    tuples = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(RandomTokens(4).ids), batch_size=BATCH)

    class TupleBatches(SpeedProbe):
        def training_step(self, batch, batch_idx):
            return super().training_step({"input_ids": batch[0], "labels": batch[0]}, batch_idx)

    with pytest.raises(TypeError, match=r"counts tokens from batch\['input_ids'\]; got a list without it"):
        make_trainer(tmp_path, [TrainingSpeed(peak_flops=PEAK)], max_steps=1).fit(TupleBatches(), tuples)
    with pytest.raises(ValueError, match="cannot tell the matmul dtype of precision 'transformer-engine'"):
        flops.precision_dtype("transformer-engine")


def test_datasheet_peaks_are_dense_figures():
    assert flops.datasheet_peak_flops("NVIDIA H200", torch.bfloat16) == 989.4e12
    assert flops.datasheet_peak_flops("NVIDIA H200 NVL", torch.bfloat16) == 835e12
    assert flops.datasheet_peak_flops("NVIDIA H200", torch.float32, tf32=True) == 494.7e12
    assert flops.datasheet_peak_flops("NVIDIA H200", torch.float32, tf32=False) == 66.9e12
    assert flops.datasheet_peak_flops("NVIDIA H100 NVL", torch.float16) == 835e12
    assert flops.datasheet_peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) is None  # left to Lightning's table
    assert flops.precision_dtype("bf16-mixed") is torch.bfloat16
    assert flops.precision_dtype("32-true") is torch.float32


def run_with_bar(root: Path, max_steps: int, **fit_kwargs) -> tuple[pl.Trainer, StepProgressBar]:
    bar = StepProgressBar()
    trainer = make_trainer(
        root, [bar, TrainingSpeed(peak_flops=PEAK)], max_steps=max_steps, enable_progress_bar=True,
        accumulate_grad_batches=2,
    )  # fmt: skip
    # 6 rows = 3 micro-batches an epoch: the steps run across epochs, which must not restart the bar.
    trainer.fit(SpeedProbe(), loader(rows=6), **fit_kwargs)
    return trainer, bar


def test_progress_bar_counts_optimizer_steps_and_shows_speed(tmp_path):
    trainer, bar = run_with_bar(tmp_path, max_steps=4)
    tqdm_bar = bar.train_progress_bar
    assert trainer.current_epoch > 0
    assert (tqdm_bar.initial, tqdm_bar.n, tqdm_bar.total, tqdm_bar.unit) == (0, 4, 4, "step")
    metrics = trainer.callback_metrics
    assert tqdm_bar.postfix.startswith(
        f"loss={float(metrics['train/loss']):.4f}, tok/s={float(metrics['train/tokens_per_s']):,.0f}, "
        f"mfu={float(metrics['train/mfu']):.1%}"
    )
    assert "train/tokens_per_s" not in tqdm_bar.postfix  # shown once, under its short label


def test_progress_bar_eta_counts_only_the_steps_left_after_resume(tmp_path):
    trainer, _ = run_with_bar(tmp_path / "a", max_steps=2)
    checkpoint = tmp_path / "step2.ckpt"
    trainer.save_checkpoint(checkpoint)

    _, bar = run_with_bar(tmp_path / "b", max_steps=5, ckpt_path=checkpoint)
    tqdm_bar = bar.train_progress_bar
    assert (tqdm_bar.initial, tqdm_bar.n, tqdm_bar.total) == (2, 5, 5)
    # 3 s into this session at step 4: 2 steps done at 1.5 s each, 1 left -> ETA 00:01 (not 4 steps/3 s).
    line = tqdm_bar.format_meter(**{**tqdm_bar.format_dict, "n": 4, "elapsed": 3.0, "rate": None})
    assert "4/5 [00:03<00:01," in line and "0.67step/s" in line
