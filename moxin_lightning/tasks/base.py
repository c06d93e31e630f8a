"""`TrainingTask`: everything the four objectives (pretraining, SFT, DPO, GRPO) share.

A task subclass only maps a batch to `(loss_sum, count)` in `loss_terms`. This base owns the rest:
- building the `Transformer` on the meta device, then activation checkpointing, `torch.compile` and FSDP2
  sharding (`ModelParallelStrategy`) in that order, then the weights: seeded, or `init_from` a release, a
  Hugging Face folder or a Lightning checkpoint;
- AdamW with Moxin's settings and the learning-rate schedule (`moxin_lightning.schedules`);
- loss normalisation by the global count of the optimizer step (all micro-batches, all ranks), which
  makes training invariant to gradient accumulation and to the number of processes;
- gradient clipping with the gradient norm logged, and validation/test loss through torchmetrics, the same on any
  number of processes: a padding batch (`moxin_lightning.data.held_out`), which only evens out the processes'
  validation steps, runs like any other and weighs nothing, in the loss and in what the task logs;
- skipping an optimizer step whose loss or gradient is not finite (no update, no scheduler step), counting it
  (`train/skipped_steps`) and stopping the run after `max_skipped_steps` in a row;
- checking that the datamodule's batches hold the keys the task reads (`batch_keys`), naming both on a mismatch.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric

from moxin_lightning.data.held_out import is_padding
from moxin_lightning.model.config import ModelConfig
from moxin_lightning.model.transformer import Transformer
from moxin_lightning.release.contents import Panel
from moxin_lightning.schedules import ScheduleKind, check_schedule, lr_factor
from moxin_lightning.tasks import parallelize
from moxin_lightning.tasks.init_from import read_initial_state

_SKIPPED_KEY = "moxin_skipped_steps"
_PARAM_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}


class TrainingTask(L.LightningModule):
    """Base LightningModule on the Moxin backbone.

    Args:
        preset: model preset (`moxin-7b`, `moxin-tiny-9m`, ...; see `python -m moxin_lightning info`).
        model_overrides: ModelConfig fields to change, e.g. `{attention: flash, max_seq_len: 4096}`.
        init_from: starting weights: a release folder (CheckpointPromotion), a Hugging Face folder or a
            Lightning checkpoint (`.ckpt` file or sharded folder). None: random, seeded by `seed`.
        seed: seed of the random initial weights (identical for any number of processes).
        lr: peak learning rate.
        betas, eps, weight_decay: AdamW settings (Moxin's pretraining: 0.9/0.95, 1e-8, 0.1).
        weight_decay_scope: what weight decay applies to: `matrices` (attention, MLP and output-head matrices; not
            norm weights or the token embedding, as litgpt, OLMo and nanoGPT do) or `all` parameters (Moxin's
            pretraining script and veRL's actor pass every parameter to one AdamW group).
        schedule: `cosine` | `linear` | `wsd` | `constant` (see `moxin_lightning.schedules`).
        warmup_steps: linear warmup steps; `warmup_ratio` (a fraction of the run) overrides it when set.
        min_lr_ratio: final learning rate as a fraction of the peak (Moxin: 0.1).
        decay_ratio: fraction of the run spent decaying, for `wsd`.
        activation_checkpointing: recompute each block's activations in backward (less memory, ~1/3 more compute).
        compile: `torch.compile` each block.
        max_skipped_steps: stop the run after this many optimizer steps in a row had a non-finite loss or
            gradient (each is skipped: no update, gradients dropped, the schedule holds). None: never stop.
    """

    reports_perplexity = False
    batch_keys: tuple[str, ...] = ("input_ids", "labels", "doc_ids")  # what `loss_terms` reads from a batch
    # what a release plots (`CheckpointPromotion`): one picture per panel; a task adds what its objective is about
    release_panels: tuple[Panel, ...] = (Panel("loss", "loss", ("train/loss", "val/loss")),)

    def __init__(
        self,
        preset: str = "moxin-7b",
        model_overrides: dict[str, Any] | None = None,
        init_from: str | None = None,
        seed: int = 1234,
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        weight_decay_scope: Literal["matrices", "all"] = "matrices",
        schedule: ScheduleKind = "cosine",
        warmup_steps: int = 2000,
        warmup_ratio: float | None = None,
        min_lr_ratio: float = 0.1,
        decay_ratio: float = 0.2,
        activation_checkpointing: bool = False,
        compile: bool = False,
        max_skipped_steps: int | None = 10,
    ) -> None:
        if max_skipped_steps is not None and max_skipped_steps < 1:
            raise ValueError(f"max_skipped_steps={max_skipped_steps} must be >= 1, or null to never stop")
        if weight_decay_scope not in ("matrices", "all"):
            raise ValueError(f"weight_decay_scope={weight_decay_scope!r} is not one of matrices, all")
        super().__init__()
        if type(self).loss_terms is TrainingTask.loss_terms:
            raise TypeError(
                f"{type(self).__name__} defines no loss_terms; use a task such as moxin_lightning.tasks.Pretrain"
            )
        self.save_hyperparameters()
        self._config = ModelConfig.from_name(preset, **(model_overrides or {}))
        self.model: Transformer | None = None
        self._tokenizer_state: dict[str, Any] | None = None  # the tokenizer's files, kept for every checkpoint
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self._step_loss = torch.zeros(())
        self._step_count = torch.zeros((), dtype=torch.long)
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient, in the whole run
        self.skipped_in_a_row = 0
        self.last_step_skipped = False
        self.last_step_loss: float | None = None  # the last optimizer step's global mean loss (None: skipped)
        self.optimizer_steps_seen = 0  # optimizer steps this process has normalised (callbacks watch it)
        self._scoring_padding = False  # the validation/test batch being scored only evens out the processes' steps

    # -- the model --------------------------------------------------------------------------------------

    @property
    def model_config(self) -> ModelConfig:
        """The configuration of the model being trained (with any RoPE theta change applied)."""
        return self._config

    def set_rope_theta(self, theta: float) -> None:
        """Change RoPE's base (context extension); the model computes its rotary tables from it each forward."""
        self._config = self._config.replace(rope_theta=float(theta))
        if self.model is not None:
            self.model.config = self._config

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.build_model()

    def build_model(self, trainable: bool = True) -> Transformer:
        """The backbone, parallelised for the trainer's strategy and holding its initial weights.

        `trainable=False` builds a frozen copy of the starting point (DPO's reference): no activation
        checkpointing (it never runs backward) and no gradients."""
        with torch.device("meta"):
            model = Transformer(self._config)
        if self.hparams.activation_checkpointing and trainable:
            parallelize.checkpoint_activations(model)
        if self.hparams.compile:
            parallelize.compile_blocks(model)
        strategy = self._trainer.strategy if self._trainer is not None else None
        if _is_sharded(strategy):
            if self.device_mesh["tensor_parallel"].size() != 1:
                raise ValueError(
                    f"ModelParallelStrategy gives {self.device_mesh['tensor_parallel'].size()} devices to tensor "
                    "parallelism (its default 'auto'), which the tasks do not support yet; set the strategy's "
                    "tensor_parallel_size: 1 (FSDP2 over all devices)"
                )
            param_dtype = _PARAM_DTYPES.get(str(self._trainer.precision))
            parallelize.shard(model, self.device_mesh["data_parallel"], param_dtype)
        model.to_empty(device=strategy.root_device if strategy is not None else torch.device("cpu"))
        self._load_initial_weights(model)
        if not trainable:
            model.requires_grad_(False).eval()
        return model

    def _load_initial_weights(self, model: Transformer) -> None:
        if self.hparams.init_from is None:
            parallelize.initialise(model, self.hparams.seed)
            return
        distributed = self._trainer is not None and self._trainer.world_size > 1
        first = not distributed or self._trainer.global_rank == 0
        state = read_initial_state(self.hparams.init_from, self._config) if first else {}
        parallelize.load_full_state(model, state, distributed=distributed)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full, unsharded weights on the CPU in our names. A collective under FSDP2: call it on every rank."""
        return parallelize.full_state(self.model)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Make the checkpoint self-contained for inference: the model config and the data's tokenizer files
        (`moxin_lightning.checkpoint.load_model` reads both, so `generate --checkpoint last.ckpt` just works)."""
        from moxin_lightning.checkpoint import MODEL_CONFIG_KEY, TOKENIZER_KEY, tokenizer_state

        checkpoint[MODEL_CONFIG_KEY] = self.model_config.to_dict()
        tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is not None:
            if self._tokenizer_state is None or self._tokenizer_state["fingerprint"] != tokenizer.fingerprint:
                self._tokenizer_state = tokenizer_state(tokenizer)
            checkpoint[TOKENIZER_KEY] = self._tokenizer_state
        checkpoint[_SKIPPED_KEY] = {"total": self.skipped_steps, "in_a_row": self.skipped_in_a_row}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run keeps counting skipped steps where it stopped (the stop rule spans the restart)."""
        skipped = checkpoint.get(_SKIPPED_KEY, {})
        self.skipped_steps, self.skipped_in_a_row = skipped.get("total", 0), skipped.get("in_a_row", 0)

    # -- optimisation ---------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        hp = self.hparams
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            matrix = param.ndim >= 2 and not name.startswith("embed.")
            (decay if matrix or hp.weight_decay_scope == "all" else no_decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
            eps=hp.eps,
        )
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("the run has no length: set trainer.max_steps (pretraining streams one endless epoch)")
        total = int(total)
        warmup = self.check_schedule(total)
        factor = partial(
            lr_factor,
            total_steps=total,
            warmup_steps=warmup,
            kind=hp.schedule,
            min_lr_ratio=hp.min_lr_ratio,
            decay_ratio=hp.decay_ratio,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, factor), "interval": "step"}}

    def check_schedule(self, total_steps: int) -> int:
        """The warmup steps of a run of `total_steps` optimizer steps; one-line errors for optimizer and schedule
        settings that would fail or silently train with a wrong learning rate. `moxin_lightning.preflight` calls
        it before any logger or model starts (when max_steps gives the length), `configure_optimizers` again."""
        hp = self.hparams
        if not hp.lr > 0:
            raise ValueError(f"model.init_args.lr={hp.lr} must be > 0 (the peak learning rate)")
        warmup = round(hp.warmup_ratio * total_steps) if hp.warmup_ratio is not None else hp.warmup_steps
        check_schedule(
            hp.schedule,
            warmup_steps=warmup,
            total_steps=total_steps,
            min_lr_ratio=hp.min_lr_ratio,
            decay_ratio=hp.decay_ratio,
        )
        return warmup

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the per-unit losses, number of units) of one micro-batch; units are tokens for pretraining.

        Every task defines it (checked in `__init__`)."""
        raise TypeError(f"{type(self).__name__} defines no loss_terms")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, count = self.loss_terms(batch)
        self.track_step_loss(loss_sum, count)
        # a sum: on_before_optimizer_step divides the gradients by the step's global count
        return loss_sum

    def track_step_loss(self, loss_sum: torch.Tensor, count: torch.Tensor) -> None:
        """Add a micro-batch's loss sum and count to the optimizer step's totals (normalised before the step)."""
        self._step_loss = self._step_loss.to(loss_sum.device) + loss_sum.detach().float()
        self._step_count = self._step_count.to(count.device) + count

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Turn the summed gradients into the mean over the optimizer step's global count, or skip the step.

        Lightning divided each micro-batch loss by `accumulate_grad_batches`, and DDP/FSDP2 average over ranks;
        multiplying by both and dividing by the global count leaves sum(grad loss_sum) / global count.

        A step whose global loss or any gradient (any rank's shard) is not finite is skipped on every rank: the
        flag rides in the same all-reduce as the loss, so all ranks decide alike. Skipping drops the gradients
        (`grad = None`), which AdamW reads as "no update" for every parameter: weights, moments and its step
        count stay as they were, and weight decay does not apply. `lr_scheduler_step` then holds the schedule.
        The backward still ran: returning None from training_step on one rank would desynchronise DDP/FSDP2."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        norms = torch._foreach_norm(local) if local else []
        bad = (~torch.stack([n.float() for n in norms]).isfinite()).sum() if norms else torch.zeros(())
        totals = torch.stack([self._step_loss, self._step_count.to(self._step_loss.dtype), bad.to(self._step_loss)])
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        loss_sum, count, bad = totals[0], totals[1], totals[2]
        if count <= 0:
            raise ValueError("an optimizer step had no target token at all; check the data's labels")
        self._step_loss = torch.zeros((), device=self._step_loss.device)
        self._step_count = torch.zeros((), dtype=torch.long, device=self._step_count.device)
        self.optimizer_steps_seen += 1
        if bad > 0 or not torch.isfinite(loss_sum):
            self._skip_step(optimizer, loss_sum / count)
            return
        self.last_step_skipped, self.skipped_in_a_row = False, 0
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / count
        for param in self.model.parameters():
            if param.grad is not None:
                param.grad.mul_(scale.to(param.grad.dtype) if param.grad.dtype != scale.dtype else scale)
        self.last_step_loss = float(loss_sum / count)
        self.log("train/loss", loss_sum / count, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def _skip_step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        """Drop this step's gradients, count it, and stop the run after `max_skipped_steps` in a row."""
        for param in self.model.parameters():
            param.grad = None
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        self.last_step_skipped, self.last_step_loss = True, None
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
        limit = self.hparams.max_skipped_steps
        step = self.trainer.global_step
        rank_zero_warn(f"step {step}: skipped, the loss ({float(loss):.4g}) or a gradient is not finite")
        if limit is not None and self.skipped_in_a_row >= limit:
            raise NonFiniteTraining(
                f"{self.skipped_in_a_row} optimizer steps in a row (steps {step - self.skipped_in_a_row + 1}-{step}) "
                f"had a non-finite loss or gradient (max_skipped_steps: {limit}); the run stops: resume from an "
                "earlier checkpoint with a lower lr, or check the data of those steps"
            )

    def lr_scheduler_step(self, scheduler: Any, metric: Any | None = None) -> None:
        """A skipped step does not advance the schedule: the next update gets the LR the skipped one would have."""
        if self.last_step_skipped:
            return
        scheduler.step() if metric is None else scheduler.step(metric)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by global norm (`trainer.gradient_clip_val`, Moxin: 1.0) and log the norm before clipping."""
        if self.last_step_skipped:  # no gradients left to clip
            return
        params = [p for p in self.model.parameters() if p.grad is not None]
        if gradient_clip_algorithm == "value" and gradient_clip_val:
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            max_norm = math.inf
        else:
            max_norm = gradient_clip_val or math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    # -- the data ---------------------------------------------------------------------------------------------

    def check_batch(self, batch: Any) -> None:
        """Refuse a datamodule whose batches lack what this task reads (e.g. DPO on pretraining data), naming
        the task, the datamodule and the missing keys instead of a KeyError deep in `loss_terms`."""
        if not isinstance(batch, dict):
            return
        missing = [key for key in self.batch_keys if key not in batch]
        if missing:
            data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            where = type(data).__name__ if data is not None else "the data loader"
            raise ValueError(
                f"{type(self).__name__} needs batches with {', '.join(self.batch_keys)}; {where} gives "
                f"{', '.join(batch) or 'no keys'} (missing: {', '.join(missing)}); pair the task with its "
                "datamodule (see conf/)"
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._scoring_padding = False
        self.check_batch(batch)

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._scoring_padding = is_padding(batch)
        self.check_batch(batch)

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._scoring_padding = is_padding(batch)
        self.check_batch(batch)

    # -- evaluation ---------------------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss)

    def _evaluate(self, batch: dict[str, torch.Tensor], metric: MeanMetric) -> None:
        """Add a batch's loss, weighted by its count (tokens for pretraining), to the pass's metric. Every batch
        updates it, a padding batch with weight 0, so every process has as many updates."""
        loss_sum, count = self.loss_terms(batch)
        if is_padding(batch):
            loss_sum, count = torch.zeros_like(loss_sum), torch.zeros_like(count)
        metric.update(loss_sum / count.clamp(min=1), weight=count)

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's `log`; while a padding batch is scored, the value is logged with batch size 0: it weighs
        nothing in the epoch's mean (Lightning's default reduction) but keeps the metric, and so its
        synchronisation, on every process (DPO's rewards and GRPO's rollout statistics are logged from the step)."""
        if self._scoring_padding and not self.training:
            kwargs["batch_size"] = 0
        super().log(name, value, *args, **kwargs)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val", self.val_loss)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test", self.test_loss)

    def _log_evaluation(self, stage: str, metric: MeanMetric) -> None:
        """Token-weighted mean loss over the whole pass and all ranks (torchmetrics syncs it), and its exp.

        Whether there is anything to log is decided on the weight of all ranks together, so that every rank makes
        the same collectives whatever its share held (torchmetrics' sync is one of them); no batch with a count,
        no value."""
        self._scoring_padding = False
        weight = metric.weight.detach().double()
        if self._trainer is not None and self.trainer.world_size > 1:
            weight = self.trainer.strategy.reduce(weight, reduce_op="sum")
        if weight <= 0:
            metric.reset()
            return
        loss = metric.compute()
        metric.reset()
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=False)
        if self.reports_perplexity:
            self.log(f"{stage}/ppl", torch.exp(loss), sync_dist=False)


class NonFiniteTraining(ValueError):
    """Too many optimizer steps in a row had a non-finite loss or gradient: a one-line stop (exit 2)."""


def _is_sharded(strategy: Any) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)
