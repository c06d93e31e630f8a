"""Training speed: tokens per second, MFU and tokens seen, logged once per optimizer step.

Tokens are counted from the batches themselves (`batch["input_ids"].numel()` per micro-batch, times the world
size: every rank trains on a batch of the same shape), so the figure is right whatever the batch size,
gradient accumulation or sequence length schedule. A task whose batches are not rows of `input_ids` says what a
training batch cost with `batch_work(batch) -> (tokens, FLOPs)`, this process's share: DPO counts its chosen and
rejected rows as the policy runs them (and a frozen reference's forward in the FLOPs), GRPO the rollout rows it
trains on (and their generation, a forward over the same rows, in the FLOPs: its tokens/s and MFU cover the whole
step, sampling included). The rate is a sliding window over the last `window`
optimizer steps of wall time, so a slow first step (compilation, data loader start-up) leaves the figure after
`window` steps. Validation time is left out: it is not training.

MFU (model FLOPs utilisation) = model FLOPs per second / peak FLOPs of all devices, with the model FLOPs of
each micro-batch from the task's `ModelConfig.flops_per_token(seq_len)`: what the model must compute, not
what the kernels happened to execute (activation recomputation is not credited), so it compares runs and
setups fairly. The peak is the datasheet figure of a known GPU (`moxin_lightning.flops.peak_flops`), a matmul
measured at the start of fit on another GPU, or the one given. On a CPU no MFU is reported unless a peak is given:
a CPU's peak can only be measured, and a measurement taken once at the start says nothing about a window of
training minutes later on cores that other processes share (under load it gave an "MFU" of 146%). An MFU above
100% means the peak is wrong: it is never logged; the callback warns once and stops reporting MFU.

Lightning's own `ThroughputMonitor` is not used: it needs a batch-size function (not expressible in YAML),
reports nothing until its window is full, and keeps no count across a resumed run.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from moxin_lightning.flops import peak_flops, precision_dtype
from moxin_lightning.model.config import ModelConfig


class TrainingSpeed(Callback):
    """Logs "train/tokens_per_s", "train/mfu" and "train/tokens_seen" at every optimizer step.

    Args:
        window: optimizer steps the tokens/s and MFU figures average over.
        peak_flops: FLOP/s of one device for MFU. None: the datasheet figure of a known GPU in the dtype the
            trainer's precision multiplies in, else, on another GPU, the best rate of a matmul measured at the
            start of fit; on a CPU, no MFU.
    """

    def __init__(self, window: int = 20, peak_flops: float | None = None) -> None:
        if window < 1:
            raise ValueError(f"TrainingSpeed window={window} must be >= 1 (optimizer steps to average over)")
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"TrainingSpeed peak_flops={peak_flops} must be > 0 (FLOP/s of one device), or null")
        self.window = window
        self.peak_flops = peak_flops
        self.tokens_seen = 0  # global, over the whole run: saved in checkpoints
        self.clock = time.perf_counter  # replaceable in tests
        self._flops_done = 0.0  # global model FLOPs since this callback was created (only differences are used)
        self._marks: deque[tuple[float, int, float]] = deque(maxlen=window + 1)  # (training time, tokens, FLOPs)
        self._paused = 0.0  # seconds spent in validation, taken out of the training time
        self._pause_started: float | None = None
        self._last_step = -1
        self._device = torch.device("cpu")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        config = getattr(pl_module, "model_config", None)
        if not isinstance(config, ModelConfig):
            raise TypeError(
                f"TrainingSpeed needs `{type(pl_module).__name__}.model_config` (a ModelConfig) to compute MFU; "
                "use a moxin_lightning task or remove the callback"
            )
        self._device = trainer.strategy.root_device
        if self.peak_flops is None and self._device.type == "cpu":
            rank_zero_info("TrainingSpeed: no MFU on a CPU (no trustworthy peak); set peak_flops to report one")
        elif self.peak_flops is None:
            peak = peak_flops(self._device, precision_dtype(trainer.precision))
            self.peak_flops = peak.flops
            rank_zero_info(f"TrainingSpeed: MFU relative to {peak.flops / 1e12:.3f} TFLOP/s per device ({peak.source})")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._marks.clear()
        self._marks.append((self._training_time(), self.tokens_seen, self._flops_done))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        tokens, flops = batch_work(pl_module, batch)
        self.tokens_seen += tokens * trainer.world_size
        self._flops_done += flops * trainer.world_size
        if trainer.global_step == self._last_step:  # still accumulating gradients
            return
        self._last_step = trainer.global_step
        self._marks.append((self._training_time(), self.tokens_seen, self._flops_done))
        metrics = self.compute(trainer.world_size)
        for name, value in metrics.items():
            pl_module.log(
                name,
                torch.tensor(value, dtype=torch.float64),  # float64: a token count stays exact past 2**24
                on_step=True,
                on_epoch=False,
                prog_bar=name == "train/tokens_per_s",
            )

    def compute(self, world_size: int) -> dict[str, float]:
        """The figures over the window: global tokens/s, MFU over all devices (when there is a peak and the MFU
        is possible), and the tokens seen so far."""
        (start, tokens_start, flops_start), (end, tokens_end, flops_end) = self._marks[0], self._marks[-1]
        seconds = end - start
        if seconds <= 0:  # a clock too coarse to see the step: no rate rather than a division by zero
            return {"train/tokens_seen": float(self.tokens_seen)}
        metrics = {"train/tokens_per_s": (tokens_end - tokens_start) / seconds}
        if self.peak_flops is not None:
            mfu = (flops_end - flops_start) / seconds / (self.peak_flops * world_size)
            if mfu <= 1.0:
                metrics["train/mfu"] = mfu
            else:
                rank_zero_warn(
                    f"TrainingSpeed: the model computes {mfu:.0%} of peak_flops={self.peak_flops:.4g} FLOP/s per "
                    "device, so that peak is wrong; MFU is no longer reported (set TrainingSpeed peak_flops)"
                )
                self.peak_flops = None
        return {**metrics, "train/tokens_seen": float(self.tokens_seen)}

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._pause_started = self._now()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pause_started is not None:
            self._paused += self._now() - self._pause_started
            self._pause_started = None

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_seen = int(state_dict["tokens_seen"])

    def _training_time(self) -> float:
        return self._now() - self._paused

    def _now(self) -> float:
        """Wall time once queued GPU work is done (otherwise a step's time would leak into the next one)."""
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return self.clock()


def batch_work(pl_module: pl.LightningModule, batch: Any) -> tuple[int, float]:
    """Tokens and model FLOPs of one training micro-batch on this process: the task's own `batch_work(batch)`
    where it has one (its batches are pairs or prompts), else the `input_ids` rows trained forward and backward."""
    own = getattr(pl_module, "batch_work", None)
    if callable(own):
        tokens, flops = own(batch)
        return int(tokens), float(flops)
    input_ids = batch.get("input_ids") if isinstance(batch, dict) else None
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"TrainingSpeed counts tokens from batch['input_ids']; got a {type(batch).__name__} without it, and "
            f"{type(pl_module).__name__} has no batch_work(batch) saying what a batch trains on"
        )
    return input_ids.numel(), input_ids.numel() * pl_module.model_config.flops_per_token(input_ids.shape[-1])
