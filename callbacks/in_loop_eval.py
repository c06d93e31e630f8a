"""In-loop evaluation: lm-eval task sets on the model as it trains, every N optimizer steps, logged as `eval/...`.

OLMo-core runs downstream evaluators inside its training loop; this does the same on Lightning, so phase 3's
capability mix (or SFT, DPO, GRPO) can be watched as it trains rather than after each release. Every
`every_n_steps` optimizer steps the task set is scored on the live model (`moxin_lightning.evaluation.in_loop`:
our `MoxinLM` on the task's `model`, in eval mode and without gradients, its modes restored afterwards), and the
scores go to every logger of the trainer (W&B, CSV, TensorBoard) at that step as `eval/<task>/<metric>`,
e.g. `eval/moxin_local_arith_mc/acc`; `eval/seconds` is the time it took. They also land in
`trainer.callback_metrics`, so a `ModelCheckpoint` can monitor one.

Under DDP and FSDP2 each rank scores its share of the batches and the answers are exchanged: every rank logs
the same scores, those of a one-process run (FSDP2 gathers the full weights for the evaluation's duration).
Training is not disturbed: the random states are restored and FSDP2 forgets the evaluation's forwards.

Task names and datasets are checked when the callback is built, before any training: an unknown name or a Hub
dataset that is not cached is a one-line error. The evaluation's scores are a function of the weights, so the
callback keeps nothing in checkpoints; a resumed run evaluates again at the next multiple of `every_n_steps`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from moxin_lightning.evaluation.in_loop import TaskSet


class InLoopEvaluation(Callback):
    """Score lm-eval tasks on the training model every `every_n_steps` optimizer steps; log `<prefix>/<task>/<metric>`.

    Args:
        tasks: task or group names, a list or comma-separated: "moxin_local" (offline), "moxin_reasoning",
            "moxin_instruct", "moxin_fewshot", any lm-eval task.
        every_n_steps: optimizer steps between evaluations (at steps N, 2N, ...).
        limit: documents per task (a fraction if below 1); None for all. In-loop sets are usually cut short.
        batch_size: requests per forward pass or generation batch (per process).
        max_length: longest token window (default: the model's max_seq_len).
        tokenizer: a tokenizer folder or file for models whose datamodule has none (default: the datamodule's
            `tokenizer`, the one the data was encoded with).
        seed: seed of sampled generations (the same at every evaluation).
        prefix: first part of the logged names.
    """

    def __init__(
        self,
        tasks: str | list[str] = "moxin_local",
        every_n_steps: int = 1000,
        limit: float | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        tokenizer: str | Path | None = None,
        seed: int = 0,
        prefix: str = "eval",
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"InLoopEvaluation every_n_steps={every_n_steps!r} must be an integer >= 1")
        self.every_n_steps, self.prefix = every_n_steps, prefix.rstrip("/")
        self.task_set = TaskSet(tasks, limit=limit, batch_size=batch_size, max_length=max_length, seed=seed)
        self.tokenizer: Any = None
        if tokenizer is not None:
            from moxin_lightning.tokenizers import load_tokenizer

            path = Path(tokenizer).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"InLoopEvaluation tokenizer {path} does not exist")
            self.tokenizer = load_tokenizer(path)
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, scores) of this process's evaluations
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Find the tokenizer and check it against the model's vocabulary, before training starts."""
        if stage != "fit":
            return
        if not hasattr(pl_module, "model"):
            raise ValueError(
                f"InLoopEvaluation needs a task whose `model` is the Transformer; {type(pl_module).__name__} has none"
            )
        if self.tokenizer is None:
            self.tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if self.tokenizer is None:
            data = type(trainer.datamodule).__name__ if trainer.datamodule is not None else "no datamodule"
            raise ValueError(f"InLoopEvaluation: {data} has no tokenizer; give the callback tokenizer=PATH")
        config = getattr(pl_module, "model_config", None)
        if config is not None and self.tokenizer.vocab_size > config.vocab_size:
            raise ValueError(
                f"InLoopEvaluation: the tokenizer's {self.tokenizer.vocab_size} pieces exceed the model's "
                f"vocab_size={config.vocab_size}; give the tokenizer the model was trained with"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module.model, torch.nn.Module):  # built by configure_model, after setup
            raise ValueError(f"InLoopEvaluation: {type(pl_module).__name__}.model is not a model")
        self._last_step = trainer.global_step  # a resumed run does not repeat the evaluation of its restored step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimizer steps done; it moves on the last micro-batch of a step
        if step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Score the task set on the model now (every rank must call it), log the scores and return them."""
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        started = time.perf_counter()
        try:
            scores = self.task_set.evaluate(pl_module.model, self.tokenizer)
        finally:
            for module, training in modes.items():
                module.train(training)
        seconds = time.perf_counter() - started
        step = trainer.global_step
        self.history.append((step, scores))
        metrics = {f"{self.prefix}/{name}": value for name, value in scores.items()}
        metrics[f"{self.prefix}/seconds"] = seconds
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})
        rank_zero_info(
            f"in-loop evaluation at step {step}: {len(scores)} scores of {', '.join(self.task_set.names)} in "
            f"{seconds:.1f} s, logged as {self.prefix}/<task>/<metric>"
        )
        return scores
