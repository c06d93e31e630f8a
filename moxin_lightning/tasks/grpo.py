"""`GRPO`: group-relative policy optimisation with rollouts from our own rolling-buffer generator.

Each step takes P prompts, samples G completions per prompt with `moxin_lightning.generate.sample` on the very
weights being trained (no separate inference engine, so no train/inference mismatch to correct), scores them with
the configured rewards, turns the rewards into group-relative advantages and optimises the clipped surrogate
(`losses.grpo_loss`), optionally with a k3 KL penalty to a frozen reference (built only when beta > 0). With
`epochs_per_batch` > 1 the same rollouts are optimised several times, each pass one optimizer step, against the
log-probs they were sampled with. Optimisation is manual (Lightning's automatic loop cannot revisit a batch), but
the gradients are normalised by the global count of each optimizer step as in every task.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from moxin_lightning.decoding import DEFAULT_KV_BUDGET_BYTES
from moxin_lightning.generate import sample
from moxin_lightning.losses import IGNORE_INDEX, group_advantages, grpo_loss
from moxin_lightning.model.transformer import Transformer
from moxin_lightning.release.contents import Panel
from moxin_lightning.rewards import CombinedReward, Reward
from moxin_lightning.tasks.base import TrainingTask
from moxin_lightning.tasks.parallelize import full_weights


@dataclass
class Rollouts:
    """G completions of each of P prompts, as right-padded training rows."""

    input_ids: torch.Tensor  # (P*G, T)
    labels: torch.Tensor  # (P*G, T): completion tokens as next-token targets, IGNORE_INDEX elsewhere
    advantages: torch.Tensor  # (P*G,)
    old_logps: torch.Tensor | None  # (P*G, T) log-probs of the sampling weights; None: one pass, they are the current
    ref_logps: torch.Tensor | None


class GRPO(TrainingTask):
    """GRPO on `moxin_lightning.datamodules.PromptData` batches {prompt_ids, prompt_text, answer, prompt_index}.

    Args:
        rewards: reward functions (`moxin_lightning.rewards`, or any `Reward` by class_path).
        reward_weights: their weights (default 1 each).
        group_size: completions per prompt (G).
        beta: KL penalty to the frozen starting weights (0: no reference model is built).
        temperature, top_p: sampling settings of the rollouts.
        max_response_length: new tokens per completion; a completion without EOS by then is truncated.
        clip_low, clip_high: the surrogate's clipping range (1 - clip_low, 1 + clip_high).
        loss_agg: `token_mean` (DAPO), `seq_mean_token_mean` (original GRPO), `seq_mean_token_sum_norm` (Dr. GRPO).
        advantage_scale: `group_std`, `batch_std` or `none`.
        advantage_eps: added to the std the advantages are divided by (TRL: 1e-4; veRL, so DeepScaleR: 1e-6).
        kl_clamp: bound of the per-token k3 KL, +-kl_clamp (veRL's low_var_kl: 10); None: unclamped, as TRL.
        entropy_coeff: weight of the entropy bonus subtracted from the token loss (veRL: 0.001); 0 computes no
            entropy. Logged as `entropy` (mean over scored tokens) when on.
        epochs_per_batch: optimisation passes (optimizer steps) over each batch of rollouts.
        micro_batch_size: rollouts per forward/backward within a pass (the step's gradient does not depend on it).
        max_grad_norm: clipping of each optimizer step's global gradient norm (None: no clipping).
        rollout_kv_budget_bytes: KV-cache memory per process for the rollouts (`moxin_lightning.decoding`): it sets
            how many rollouts decode at once; the rest wait and take the slot of the next one that ends. Each
            prompt is prefilled once for its G completions, and draws never go past the tokenizer's vocabulary.
            Logged per step: `generation_tokens_per_s`, `slot_occupancy` (live rows / slots over decode steps),
            `generation_share` of the step.
        **kwargs: the shared settings of `TrainingTask`; `conf/grpo.yaml` sets Moxin-Reasoning's.
    """

    batch_keys = ("prompt_ids", "prompt_text", "answer")
    release_panels = (
        *TrainingTask.release_panels,
        Panel("reward_mean", "mean reward", ("train/reward_mean", "val/reward_mean")),
        Panel("completion_length", "completion length (tokens)", ("train/completion_length", "val/completion_length")),
        Panel("truncation_rate", "truncation rate (no EOS)", ("train/truncation_rate", "val/truncation_rate")),
    )

    def __init__(
        self,
        rewards: list[Reward],
        reward_weights: list[float] | None = None,
        group_size: int = 8,
        beta: float = 0.0,
        temperature: float = 0.6,
        top_p: float = 1.0,
        max_response_length: int = 1024,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean",
        advantage_scale: Literal["group_std", "batch_std", "none"] = "group_std",
        advantage_eps: float = 1e-4,
        kl_clamp: float | None = None,
        entropy_coeff: float = 0.0,
        epochs_per_batch: int = 1,
        micro_batch_size: int | None = None,
        max_grad_norm: float | None = 1.0,
        rollout_kv_budget_bytes: int = DEFAULT_KV_BUDGET_BYTES,
        **kwargs: Any,
    ) -> None:
        if group_size < 2:
            raise ValueError(f"group_size={group_size}: group-relative advantages need at least 2 completions")
        if advantage_eps < 0 or entropy_coeff < 0 or (kl_clamp is not None and kl_clamp <= 0):
            raise ValueError(
                f"need advantage_eps >= 0, entropy_coeff >= 0 and kl_clamp > 0 (or null); got {advantage_eps}, "
                f"{entropy_coeff}, {kl_clamp}"
            )
        if epochs_per_batch < 1 or (micro_batch_size is not None and micro_batch_size < 1):
            raise ValueError("epochs_per_batch and micro_batch_size must be >= 1")
        if not (math.isfinite(temperature) and temperature >= 0) or not 0 < top_p <= 1:
            raise ValueError(f"need a finite temperature >= 0 and 0 < top_p <= 1; got {temperature}, {top_p}")
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.reward = CombinedReward(rewards, reward_weights)
        self.group_size, self.beta, self.temperature, self.top_p = group_size, beta, temperature, top_p
        self.max_response_length, self.clip_low, self.clip_high = max_response_length, clip_low, clip_high
        self.loss_agg, self.advantage_scale, self.advantage_eps = loss_agg, advantage_scale, advantage_eps
        self.kl_clamp, self.entropy_coeff = kl_clamp, entropy_coeff
        self.epochs_per_batch, self.micro_batch_size, self.max_grad_norm = (
            epochs_per_batch,
            micro_batch_size,
            max_grad_norm,
        )
        self.rollout_kv_budget_bytes = rollout_kv_budget_bytes
        self._reference: Transformer | None = None
        self._rollout_seed = 0
        self._trained_rows = (0, 0)  # (rollouts, row length) of the last training step, for batch_work

    def configure_model(self) -> None:
        super().configure_model()
        if self.beta > 0 and self._reference is None:
            object.__setattr__(self, "_reference", self.build_model(trainable=False))

    def loss_terms(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The surrogate on fresh rollouts of `batch` (training itself runs `training_step`'s passes)."""
        rollouts, _ = self.rollout(batch)
        loss_sum, count, _ = self._surrogate(rollouts, slice(None))
        return loss_sum, count

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Held-out prompts are judged by their rewards: `val/reward_mean` (and the rest of the rollout stats)."""
        self._log_rollout_stats("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._log_rollout_stats("test", batch)

    def _log_rollout_stats(self, stage: str, batch: dict[str, Any]) -> None:
        _, stats = self.rollout(batch)
        for name in ("reward_mean", "completion_length", "truncation_rate"):
            self.log(f"{stage}/{name}", stats[name], on_epoch=True, batch_size=len(batch["answer"]), sync_dist=True)

    # -- rollouts --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any]) -> tuple[Rollouts, dict[str, float]]:
        """Sample G completions per prompt, score them and build training rows; also the rollout statistics."""
        tokenizer = self.trainer.datamodule.tokenizer
        prompts = [list(ids) for ids in batch["prompt_ids"] for _ in range(self.group_size)]
        eos = tokenizer.eos_id
        self._rollout_seed += 1
        was_training = self.model.training
        self.model.eval()
        started = time.perf_counter()
        # Under FSDP2 the weights are gathered once for the whole decode: each rank's rollouts end at their own
        # lengths, so ranks run different numbers of forwards, which must not hold collectives.
        with full_weights(self.model):
            generation = sample(
                self.model,
                prompts,
                self.max_response_length,
                temperature=self.temperature,
                top_p=self.top_p,
                eos_id=eos,
                vocab_limit=tokenizer.vocab_size,  # a padded vocabulary's extra ids have no text
                kv_budget_bytes=self.rollout_kv_budget_bytes,
                seed=self.hparams.seed * 1_000_003 + self._rollout_seed * 97 + self.global_rank,
            )
        generation_seconds = time.perf_counter() - started
        self.model.train(was_training)
        completions = generation.tokens
        texts = [tokenizer.decode([t for t in c if t != eos]) for c in completions]
        answers = [str(a) for a in batch["answer"] for _ in range(self.group_size)]
        prompt_texts = [p for p in batch["prompt_text"] for _ in range(self.group_size)]
        rewards = torch.tensor(self.reward(texts, answers, prompt_texts), dtype=torch.float32)
        advantages = group_advantages(rewards, self.group_size, scale=self.advantage_scale, eps=self.advantage_eps)
        input_ids, labels = _rows(prompts, completions, pad_id=max(tokenizer.pad_id, 0))
        input_ids, labels = input_ids.to(self.device), labels.to(self.device)
        old_logps = None  # one pass: the sampling weights are the weights being optimised, no extra forward
        if self.epochs_per_batch > 1:
            old_logps = self.model(input_ids, targets=labels, target_logprobs=True).detach()
        ref_logps = None
        if self._reference is not None:
            ref_logps = self._reference(input_ids, targets=labels, target_logprobs=True)
        grouped = rewards.view(-1, self.group_size)
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
        truncated = [not c or c[-1] != eos for c in completions]
        stats = {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "groups_without_signal": (grouped.max(1).values == grouped.min(1).values).float().mean().item(),
            "completion_length": lengths.mean().item(),
            "truncation_rate": sum(truncated) / len(truncated),
            "generation_tokens_per_s": lengths.sum().item() / max(generation_seconds, 1e-9),
            "slot_occupancy": generation.stats.occupancy,
            "rollout_slots": float(generation.stats.slots),
            "prefill_tokens": float(generation.stats.prefill_tokens),
            "generation_seconds": generation_seconds,
        }
        failures = sum(self.reward.last_failures.values()) if hasattr(self.reward, "last_failures") else 0
        stats["reward_failures"] = float(failures)
        return Rollouts(input_ids, labels, advantages.to(self.device), old_logps, ref_logps), stats

    # -- optimisation ----------------------------------------------------------------------------------------

    def _surrogate(self, rollouts: Rollouts, rows: slice) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        labels = rollouts.labels[rows]
        entropy = None
        if self.entropy_coeff > 0:
            logps, entropy = self.model(
                rollouts.input_ids[rows], targets=labels, target_logprobs=True, target_entropy=True
            )
        else:
            logps = self.model(rollouts.input_ids[rows], targets=labels, target_logprobs=True)
        return grpo_loss(
            logps,
            logps.detach() if rollouts.old_logps is None else rollouts.old_logps[rows],
            rollouts.advantages[rows],
            (labels != IGNORE_INDEX).float(),
            ref_logps=None if rollouts.ref_logps is None else rollouts.ref_logps[rows],
            beta=self.beta,
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            loss_agg=self.loss_agg,
            max_completion_length=self.max_response_length,
            kl_clamp=self.kl_clamp,
            entropy=entropy,
            entropy_coeff=self.entropy_coeff,
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        step_started = time.perf_counter()
        rollouts, stats = self.rollout(batch)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        total = rollouts.input_ids.shape[0]
        size = self.micro_batch_size or total
        self._trained_rows = tuple(rollouts.input_ids.shape)
        for _ in range(self.epochs_per_batch):
            optimizer.zero_grad()
            for start in range(0, total, size):
                loss_sum, count, loss_stats = self._surrogate(rollouts, slice(start, start + size))
                self.track_step_loss(loss_sum, count)
                self.manual_backward(loss_sum)
            optimizer.step()  # on_before_optimizer_step normalises by the global count, then clips (or skips)
            if not self.last_step_skipped:  # a skipped step holds the schedule, as in automatic optimisation
                scheduler.step()
        stats.update({name: float(value) for name, value in loss_stats.items()})
        stats["generation_share"] = stats.pop("generation_seconds") / (time.perf_counter() - step_started)
        for name, value in stats.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name == "reward_mean")

    def batch_work(self, batch: dict[str, Any]) -> tuple[int, float]:
        """Tokens and model FLOPs of the last training step, for `TrainingSpeed` (the batch holds only prompts):
        the rollout rows (prompt + completion, padded) trained forward and backward in each of `epochs_per_batch`
        passes, plus one forward over the same rows each for sampling them (prefill and KV-cached decoding), for
        the log-probs they were sampled with (several passes only) and for the frozen reference (beta > 0)."""
        rows, length = self._trained_rows
        tokens = rows * length
        forwards = 1 + (self.epochs_per_batch > 1) + (self._reference is not None)
        passes = self.epochs_per_batch + forwards / 3  # a forward is a third of a forward and backward
        return tokens * self.epochs_per_batch, tokens * self.model_config.flops_per_token(length) * passes

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)  # gradients / global count of the step, or a skip
        self.configure_gradient_clipping(optimizer, self.max_grad_norm)  # manual optimisation: clip here


def _rows(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt + completion per row, right-padded; labels are the completion tokens, at the positions predicting them."""
    length = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), length), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        input_ids[row, : len(prompt) + len(completion)] = torch.tensor(prompt + completion)
        if completion:
            labels[row, len(prompt) - 1 : len(prompt) + len(completion) - 1] = torch.tensor(completion)
    return input_ids, labels
