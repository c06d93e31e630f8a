"""Numerics: a step whose loss or gradient is not finite is skipped, counted and, after enough in a row, stops
the run with one line; a loss spike is flagged, a smooth curve is not.

What "skipped" means (README, Failure behaviour / Numerics): no optimizer update (weights and AdamW's state as
they were), gradients dropped, the LR schedule held; `train/skipped_steps` counts the run's skipped steps.
NaN is injected by a tiny task subclass at chosen optimizer steps, in its loss or in one gradient.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from moxin_lightning.callbacks import LossSpikes
from moxin_lightning.tasks import Pretrain
from moxin_lightning.tasks.base import NonFiniteTraining
from tests.prepared_data import fresh_environment, write_dataset
from tests.test_grpo_task import Prompts, grpo
from tests.test_task import TINY, Loader, batches

ROOT = Path(__file__).resolve().parents[2]


class NaNPretrain(Pretrain):
    """Pretrain whose loss is NaN at optimizer steps `nan_loss_steps`, or whose first gradient is inf at
    `inf_grad_steps` (the loss stays finite there)."""

    def __init__(self, nan_loss_steps: list[int] | None = None, inf_grad_steps: list[int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.nan_loss_steps, self.inf_grad_steps = set(nan_loss_steps or []), set(inf_grad_steps or [])

    def loss_terms(self, batch):
        loss_sum, count = super().loss_terms(batch)
        if self.training and self.trainer.global_step in self.nan_loss_steps:
            loss_sum = loss_sum * float("nan")
        return loss_sum, count

    def on_after_backward(self) -> None:
        if self.trainer.global_step in self.inf_grad_steps:
            next(self.model.parameters()).grad[0].fill_(float("inf"))


class Snapshots(Callback):
    """The weights before and after every optimizer step, and the LR each step ran with."""

    def __init__(self) -> None:
        self.before: list[dict[str, torch.Tensor]] = []
        self.after: list[dict[str, torch.Tensor]] = []
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[name], b[name]) for name in a)


def fit(module: L.LightningModule, steps: int, callbacks=(), data=None) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, max_steps=steps, callbacks=list(callbacks),
    )  # fmt: skip
    if data is None:
        trainer.fit(module, train_dataloaders=Loader(batches(steps)))
    else:
        trainer.fit(module, data)
    return trainer


def task(**kwargs) -> NaNPretrain:
    settings = dict(preset="moxin-tiny-9m", model_overrides=TINY, lr=1e-3, warmup_steps=0, schedule="linear")
    return NaNPretrain(**{**settings, **kwargs})


@pytest.mark.parametrize("where", ["nan_loss_steps", "inf_grad_steps"])
def test_a_non_finite_step_is_skipped_weights_optimizer_and_schedule_unchanged(where):
    module, snapshots = task(**{where: [2, 3]}), Snapshots()
    trainer = fit(module, steps=6, callbacks=[snapshots])
    updated = [changed(before, after) for before, after in zip(snapshots.before, snapshots.after, strict=True)]
    assert updated == [True, True, False, False, True, True]
    assert (module.skipped_steps, module.skipped_in_a_row) == (2, 0)
    assert trainer.global_step == 6  # a skipped step still consumes its batch and counts toward max_steps
    optimizer = trainer.optimizers[0]
    assert {int(state["step"]) for state in optimizer.state.values()} == {4}  # AdamW took 4 updates, not 6
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4  # the schedule advanced 4 times
    lrs = snapshots.lrs
    assert lrs[2] == lrs[3] == lrs[4]  # held over the skipped steps: step 4 runs with the LR step 2 would have
    assert lrs[1] != lrs[2] and lrs[4] != lrs[5]
    for param in module.model.parameters():
        assert torch.isfinite(param).all()


def test_skipped_steps_are_logged_and_kept_in_the_checkpoint():
    module, logged = task(nan_loss_steps=[1]), []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append(float(trainer.callback_metrics["train/skipped_steps"]))

    fit(module, steps=3, callbacks=[Record()])
    assert logged == [0.0, 1.0, 1.0]
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    again = task()
    again.on_load_checkpoint(checkpoint)
    assert (again.skipped_steps, again.skipped_in_a_row) == (1, 0)


def test_n_skipped_steps_in_a_row_stop_the_run_and_isolated_ones_do_not():
    module = task(nan_loss_steps=[1, 3, 4, 6, 7], max_skipped_steps=3)
    fit(module, steps=9)  # never 3 in a row
    assert module.skipped_steps == 5
    module = task(nan_loss_steps=[1, 3, 4, 5, 6], max_skipped_steps=3)
    with pytest.raises(NonFiniteTraining) as stop:
        fit(module, steps=9)
    assert str(stop.value) == (
        "3 optimizer steps in a row (steps 3-5) had a non-finite loss or gradient (max_skipped_steps: 3); the run "
        "stops: resume from an earlier checkpoint with a lower lr, or check the data of those steps"
    )


def test_grpo_manual_optimisation_skips_a_non_finite_step_too():
    module, snapshots = grpo(), Snapshots()
    original = module._surrogate

    def poisoned(rollouts, rows):
        loss_sum, count, stats = original(rollouts, rows)
        return (loss_sum * float("nan") if module.trainer.global_step == 1 else loss_sum), count, stats

    module._surrogate = poisoned
    trainer = fit(module, steps=3, callbacks=[snapshots], data=Prompts())
    updated = [changed(before, after) for before, after in zip(snapshots.before, snapshots.after, strict=True)]
    assert updated == [True, False, True]
    assert module.skipped_steps == 1
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2


def test_the_stop_is_one_line_through_the_command_line_with_exit_2(tmp_path):
    data = write_dataset(tmp_path / "data", 0, 200)
    config = tmp_path / "nan.yaml"
    config.write_text(f"""
seed_everything: 7
model:
  class_path: tests.faults.test_numeric_faults.NaNPretrain
  init_args:
    preset: moxin-tiny-9m
    model_overrides: {{vocab_size: 256, dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1, head_dim: 16,
                      ffn_dim: 64, max_seq_len: 64, sliding_window: 32, attention: sdpa}}
    nan_loss_steps: [2, 3, 4, 5, 6]
    warmup_steps: 0
    max_skipped_steps: 4
data:
  class_path: moxin_lightning.datamodules.PretrainData
  init_args: {{datasets: [{data}], seq_len: 32, batch_size: 2, val_batches: 1}}
trainer:
  default_root_dir: {tmp_path / "run"}
  accelerator: cpu
  max_steps: 20
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  limit_val_batches: 0
""")
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "moxin_lightning", "fit", "--config", str(config)],
        cwd=ROOT, env={**fresh_environment(tmp_path), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: 4 optimizer steps in a row (steps 2-5) had a non-finite loss or gradient (max_skipped_steps: 4); "
        "the run stops: resume from an earlier checkpoint with a lower lr, or check the data of those steps"
    )
    assert "step 2: skipped, the loss (nan) or a gradient is not finite" in result.stderr
    assert seconds < 60


# -- loss spikes ------------------------------------------------------------------------------------------


def test_the_spike_detector_flags_an_injected_spike_and_not_a_smooth_curve():
    smooth = [4.0 * math.exp(-step / 200) + 0.01 * math.sin(step) for step in range(400)]
    quiet = LossSpikes(window=20, threshold=6.0)
    assert [quiet.observe(step, loss) for step, loss in enumerate(smooth)].count(True) == 0
    spiky = LossSpikes(window=20, threshold=6.0)
    curve = list(smooth)
    curve[250] += 1.0  # one step jumps by ~1 against a noise of ~0.01
    flagged = [step for step, loss in enumerate(curve) if spiky.observe(step, loss)]
    assert flagged == [250]
    assert spiky.spikes == 1


def test_the_spike_detector_logs_its_count_in_a_run():
    class SpikyPretrain(NaNPretrain):
        def loss_terms(self, batch):
            loss_sum, count = super().loss_terms(batch)
            return (loss_sum * 50 if self.trainer.global_step == 7 else loss_sum), count

    spikes, logged = LossSpikes(window=4, threshold=4.0), []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append(float(trainer.callback_metrics["train/loss_spikes"]))

    module = SpikyPretrain(preset="moxin-tiny-9m", model_overrides=TINY, lr=1e-4, warmup_steps=0, schedule="constant")
    fit(module, steps=8, callbacks=[spikes, Record()])
    assert spikes.spike_steps == [7]
    assert logged == [0.0] * 7 + [1.0]
    assert spikes.state_dict()["spikes"] == 1


def test_bad_spike_settings_are_one_line_errors():
    with pytest.raises(ValueError, match=r"^LossSpikes window=1 must be >= 2"):
        LossSpikes(window=1)
    with pytest.raises(ValueError, match=r"^LossSpikes threshold=nan must be a finite z-score > 0$"):
        LossSpikes(threshold=float("nan"))
    with pytest.raises(ValueError, match=r"^max_skipped_steps=0 must be >= 1, or null to never stop$"):
        task(max_skipped_steps=0)
