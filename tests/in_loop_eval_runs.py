"""Training runs with in-loop evaluation that tests/test_in_loop_eval.py compares: 1 process, DDP and FSDP2.

Run as `python -m tests.in_loop_eval_runs STRATEGY DEVICES OUT TOKENIZER` from the repository root; Lightning
starts the command again for rank 1. The run trains tests/distributed_runs.py's tiny Pretrain task on its fixed
global batches (each rank its rows) with a 512-piece vocabulary, and evaluates `moxin_local` (cut to LIMIT
documents per task) every EVERY steps with `InLoopEvaluation`. Rank 0 writes OUT/run.json (the scores of every
evaluation as each rank computed them, the batches each rank evaluated and the last evaluation's generations as
each rank returned them, the steps' losses, what the CSV logger wrote) and OUT/run.pt (the final full weights).
The tests also call `train` in their own process for the one-process reference.
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch

from tests.distributed_runs import EPS, GLOBAL_BATCH, LR, TINY, StepData, _strategy
from tests.run_callbacks import StepRecorder

VOCAB = 512  # room for the evaluation's 400-piece tokenizer (the training batches use ids below 256)
STEPS, EVERY, LIMIT, BATCH = 6, 3, 12, 4


@contextlib.contextmanager
def recording() -> Iterator[dict[str, Any]]:
    """Within: MoxinLM counts the batches it scores and generates in this process (this rank's share of the work)
    and keeps what its last `generate_until` returned (all the generations, whichever rank made them)."""
    from moxin_lightning.evaluation.lm import MoxinLM

    record: dict[str, Any] = {"score": 0, "generate": 0, "generations": []}
    originals = {name: MoxinLM.__dict__[name] for name in ("_score_batch", "_generate_batch", "generate_until")}

    def counted(name: str, kind: str):
        def method(lm: Any, *args: Any, **kwargs: Any) -> Any:
            record[kind] += 1
            return originals[name](lm, *args, **kwargs)

        return method

    def generate_until(lm: Any, *args: Any, **kwargs: Any) -> list[str]:
        record["generations"] = originals["generate_until"](lm, *args, **kwargs)
        return record["generations"]

    MoxinLM._score_batch = counted("_score_batch", "score")
    MoxinLM._generate_batch = counted("_generate_batch", "generate")
    MoxinLM.generate_until = generate_until
    try:
        yield record
    finally:
        for name, method in originals.items():
            setattr(MoxinLM, name, method)


def train(strategy: Any, devices: int, out: Path, tokenizer: Path | None, *, evaluate: bool = True) -> dict[str, Any]:
    """Train STEPS steps with (evaluate=True) or without the callback; returns the steps, the evaluations, the
    CSV log's eval columns, the batches each rank evaluated and the final full weights (a collective: every rank
    gathers them)."""
    from lightning.pytorch.loggers import CSVLogger

    from moxin_lightning.callbacks import InLoopEvaluation
    from moxin_lightning.tasks import Pretrain

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    task = Pretrain(
        preset="moxin-tiny-9m", model_overrides={**TINY, "vocab_size": VOCAB}, lr=LR, eps=EPS, warmup_steps=2,
        activation_checkpointing=False,
    )  # fmt: skip
    recorder = StepRecorder()
    callbacks: list[L.Callback] = [recorder]
    evaluation = None
    if evaluate:
        evaluation = InLoopEvaluation(
            "moxin_local", every_n_steps=EVERY, limit=LIMIT, batch_size=BATCH, tokenizer=tokenizer
        )
        callbacks.append(evaluation)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=STEPS,
        callbacks=callbacks,
        logger=CSVLogger(out, name="logs", version=0),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with recording() as record:
        trainer.fit(task, StepData(STEPS, 1, GLOBAL_BATCH))
    history = [[step, scores] for step, scores in evaluation.history] if evaluation else []
    gathered: list[Any] = [[history, record]]
    if torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, [history, record])
    return {
        "rank": trainer.global_rank,
        "steps": recorder.steps,
        "history_per_rank": [history for history, _ in gathered],
        "batches_per_rank": [{"score": r["score"], "generate": r["generate"]} for _, r in gathered],
        "generations_per_rank": [r["generations"] for _, r in gathered],
        "training_after": task.training,
        "requires_grad": all(p.requires_grad for p in task.parameters()),
        "weights": task.full_state_dict(),
    }


def logged_eval(out: Path) -> dict[int, dict[str, float]]:
    """step -> the eval/ columns the CSV logger wrote at that step."""
    rows = csv.DictReader((out / "logs" / "version_0" / "metrics.csv").open())
    logged: dict[int, dict[str, float]] = {}
    for row in rows:
        values = {key: float(value) for key, value in row.items() if key.startswith("eval/") and value}
        if values:
            logged.setdefault(int(row["step"]), {}).update(values)
    return logged


def main(argv: list[str]) -> None:
    strategy_name, devices, out, tokenizer = argv
    out = Path(out)
    result = train(_strategy(strategy_name), int(devices), out, Path(tokenizer))
    if result["rank"] == 0:
        torch.save(result.pop("weights"), out / "run.pt")
        result["logged"] = logged_eval(out)
        (out / "run.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
