"""Evaluating a model while it trains: lm-eval task sets on the live weights, the same scores in 1 or N processes.

`TaskSet` checks its task names and reads their datasets once, when it is built (so a typo or an uncached Hub
dataset fails before training starts); `TaskSet.evaluate(model, tokenizer)` then scores the model as it is now
and returns flat metrics (`{"<task>/<metric>": value}`), the same on every process:

* `MoxinLM` answers the requests (`freeze=False`: the model's modes and gradients are the caller's;
  `split_across_ranks=True` under torch.distributed: each rank computes every world-size-th batch, answers are
  exchanged). lm-eval sees one process, so every rank builds the same requests (the few-shot contexts of a
  one-process run) and computes the metrics from all answers: a 2-process run scores what 1 process scores.
* Under FSDP2 (`fully_shard`, Lightning's ModelParallelStrategy) `full_weights` gathers every sharded module's
  weights once before the evaluation and keeps them gathered through its forwards (so ranks may run different
  numbers of forwards: no collective is pending inside them), then reshards and clears FSDP2's per-iteration
  records of those forwards (`FSDPModule.reset_iter_state`), so the next training step starts as if none ran.
  During the evaluation each rank holds the whole model, as under DDP.
* Python's, NumPy's and torch's random states are restored afterwards: training draws what it would have drawn.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from moxin_lightning.evaluation.task_sets import (
    FEWSHOT_SEED,
    code_execution_allowed,
    load_task_dict,
    parse_task_names,
)
from moxin_lightning.tasks.parallelize import full_weights


class TaskSet:
    """lm-eval tasks or groups, loaded once and evaluated on a live model on demand.

    Args:
        tasks: names, as a list or comma-separated ("moxin_local", "moxin_reasoning", "gsm8k_cot,moxin_popqa").
        limit: documents per task (a fraction if below 1), as `eval --limit`; None for all.
        batch_size: requests per forward pass / generation batch.
        max_length: longest token window (default: the model's max_seq_len).
        seed: seed of sampled generations.
    """

    def __init__(
        self,
        tasks: str | list[str],
        *,
        limit: float | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        seed: int = 0,
    ) -> None:
        import os

        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ValueError(
                "in-loop evaluation needs lm-evaluation-harness: pip install -e '.[eval]' (lm_eval==0.4.13)"
            ) from None
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # as the eval command: an uncached dataset fails at once
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if limit is not None and limit <= 0:
            raise ValueError(f"limit={limit} must be > 0 (a count, or a fraction below 1)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        text = tasks if isinstance(tasks, str) else ",".join(tasks)
        if not text.replace(",", "").strip():
            raise ValueError("tasks is empty; name tasks or groups, e.g. moxin_local")
        self.names = parse_task_names(text)
        self.limit = int(limit) if limit is not None and limit >= 1 else limit
        self.batch_size, self.max_length, self.seed = batch_size, max_length, seed
        with kept_random_state(), _quiet_lm_eval():  # loading draws from Python's random generator
            self.task_dict = load_task_dict(self.names)

    @property
    def task_names(self) -> list[str]:
        """The leaf tasks that are scored."""
        return sorted(self.task_dict["tasks"])

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
        """Scores of `model` (a Transformer, plain, DDP's inner module or FSDP2-sharded) now: {"<task>/<metric>"}.
        Under torch.distributed every rank must call it; each returns the same scores."""
        from lm_eval.evaluator import evaluate

        from moxin_lightning.evaluation.lm import MoxinLM

        with full_weights(model), kept_random_state(), torch.no_grad(), _quiet_lm_eval():
            lm = MoxinLM(
                model, tokenizer, batch_size=self.batch_size, max_length=self.max_length, seed=self.seed,
                freeze=False, split_across_ranks=True, show_progress=False,
            )  # fmt: skip
            for task in self.task_dict["tasks"].values():
                task.set_fewshot_seed(seed=FEWSHOT_SEED)  # every evaluation draws the same few-shot examples
            results = evaluate(
                lm=lm,
                task_dict=self.task_dict,
                limit=self.limit,
                bootstrap_iters=0,
                log_samples=False,
                confirm_run_unsafe_code=code_execution_allowed(),
            )
        return flat_scores(results)


def flat_scores(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's results -> {"<task or group>/<metric>": value}; a metric under a filter other than "none" is named
    "<metric>.<filter>" (gsm8k_cot's "exact_match.strict-match"); standard errors and non-numbers are left out."""
    scores: dict[str, float] = {}
    for name, row in results.get("results", {}).items():
        for key, value in row.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                label = metric if filter_name == "none" else f"{metric}.{filter_name}"
                scores[f"{name}/{label}"] = float(value)
    return dict(sorted(scores.items()))


@contextlib.contextmanager
def kept_random_state() -> Iterator[None]:
    """Python's, NumPy's and torch's (CPU and CUDA) random states as they were on entry, afterwards."""
    python, numpy_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs each task it builds and each request type it runs: silenced (errors excepted) while it runs."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
