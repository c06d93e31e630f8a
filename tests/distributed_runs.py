"""Training runs that the distributed tests compare: one process, DDP and FSDP2 on the same global batches.

Run as `python -m tests.distributed_runs STRATEGY DEVICES OUT RUN...` from the repository root; Lightning starts
the command again for rank 1. Each run writes OUT/RUN.json (per-step loss and learning rate, and for FSDP2 how
the model was wrapped) and OUT/RUN.pt (the final full weights, from rank 0). The tests also call `train` in
their own process for the single-process references.

For 1 process and 2 processes to see the same data, every optimizer step has a fixed global batch of random
tokens and rank r takes its rows r, r + world, ...; labels are masked much more in even rows than in odd ones,
so the ranks (and the micro-batches of an accumulated step) hold different numbers of target tokens, and only
a loss normalised by the global count matches the one-process run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch

from tests.run_callbacks import StepRecorder

TINY = dict(
    vocab_size=256,
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    max_seq_len=256,
    sliding_window=64,
)
SEQ_LEN = 32
GLOBAL_BATCH = 4  # rows per optimizer step, over all processes and micro-batches
LR = 1e-3
# AdamW's eps (Moxin: 1e-8). An element whose gradient is only rounding noise (~1e-9, which differs with the
# reduction order) moves by a good part of lr at 1e-8; at 1e-6 it stays put, so set-ups agree to ~1e-6.
EPS = 1e-6
STEPS = 6
CHECKPOINT_EVERY = 3  # the FSDP2 resume run restarts from this step


def global_batch(step: int, rows: int = GLOBAL_BATCH) -> dict[str, torch.Tensor]:
    """The rows of optimizer step `step`: a function of the step only."""
    generator = torch.Generator().manual_seed(1000 + step)
    input_ids = torch.randint(0, TINY["vocab_size"], (rows, SEQ_LEN), generator=generator)
    labels = torch.randint(0, TINY["vocab_size"], (rows, SEQ_LEN), generator=generator)
    masked_fraction = torch.where(torch.arange(rows) % 2 == 0, 0.8, 0.1)[:, None]
    labels[torch.rand(rows, SEQ_LEN, generator=generator) < masked_fraction] = -100
    cuts = torch.randint(1, SEQ_LEN, (rows, 1), generator=generator)
    doc_ids = (torch.arange(SEQ_LEN) >= cuts).long()  # two documents per row
    return {"input_ids": input_ids, "labels": labels, "doc_ids": doc_ids}


class StepBatches:
    """This process's micro-batches: the rows of each global batch that belong to its rank, `accumulate`
    micro-batches per step. Its position is saved in checkpoints (Lightning calls state_dict/load_state_dict),
    so a resumed run continues with the next micro-batch."""

    def __init__(self, steps: int, accumulate: int, rows: int) -> None:
        self.steps, self.accumulate, self.rows = steps, accumulate, rows
        self.position = 0

    def __len__(self) -> int:
        return self.steps * self.accumulate

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        world = torch.distributed.get_world_size() if distributed else 1
        while self.position < len(self):
            step, micro = divmod(self.position, self.accumulate)
            mine = {key: rows[rank::world] for key, rows in global_batch(step, self.rows).items()}
            per_micro = self.rows // world // self.accumulate
            self.position += 1
            yield {key: rows[micro * per_micro : (micro + 1) * per_micro] for key, rows in mine.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


class StepData(L.LightningDataModule):
    def __init__(self, steps: int, accumulate: int, rows: int) -> None:
        super().__init__()
        self.steps, self.accumulate, self.rows = steps, accumulate, rows

    def train_dataloader(self) -> StepBatches:
        return StepBatches(self.steps, self.accumulate, self.rows)


def train(
    strategy: Any = "auto",
    devices: int = 1,
    *,
    accumulate: int = 1,
    rows: int = GLOBAL_BATCH,
    steps: int = STEPS,
    activation_checkpointing: bool = False,
    checkpoint_dir: Path | None = None,
    ckpt_path: Path | None = None,
    sft_reduction: str | None = None,
    nan_step: int | None = None,
) -> dict[str, Any]:
    """Train the tiny Pretrain task (or SFT with `sft_reduction`) on the fixed batches; returns the steps, the full
    final weights (on every rank: collecting them is a collective) and how the model ended up wrapped."""
    from torch.distributed.tensor import DTensor

    from moxin_lightning.tasks import SFT, Pretrain

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    task_class, extra = (Pretrain, {}) if sft_reduction is None else (SFT, {"loss_reduction": sft_reduction})
    if nan_step is not None:
        task_class, extra = _nan_task(), {"nan_step": nan_step}
    task = task_class(
        **extra,
        preset="moxin-tiny-9m",
        model_overrides=TINY,
        lr=LR,
        eps=EPS,
        warmup_steps=2,
        activation_checkpointing=activation_checkpointing,
    )
    recorder = StepRecorder()
    callbacks: list[L.Callback] = [recorder]
    if checkpoint_dir is not None:
        every = L.pytorch.callbacks.ModelCheckpoint(
            dirpath=checkpoint_dir,
            filename="{step}",
            every_n_train_steps=CHECKPOINT_EVERY,
            save_top_k=-1,
            save_last=True,
        )
        callbacks.append(every)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=1.0,
        callbacks=callbacks,
        enable_checkpointing=checkpoint_dir is not None,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=checkpoint_dir,
    )
    if rows % (devices * accumulate):
        raise ValueError(f"{rows} rows do not split into {devices} processes x {accumulate} micro-batches")
    trainer.fit(task, StepData(steps, accumulate, rows), ckpt_path=ckpt_path)
    params = dict(task.model.named_parameters())
    return {
        "steps": recorder.steps,
        "weights": task.full_state_dict(),
        "rank": trainer.global_rank,
        "root_type": type(task.model).__name__,
        "block_types": [type(block).__name__ for block in task.model.blocks],
        "block_forwards": [getattr(block.forward, "__name__", "") for block in task.model.blocks],
        "dtensor_params": sorted(name for name, p in params.items() if isinstance(p, DTensor)),
        "params": sorted(params),
        "skipped_steps": task.skipped_steps,
    }


def _nan_task() -> type:
    from moxin_lightning.tasks import Pretrain

    class NaN(Pretrain):
        """Pretrain whose loss is NaN at optimizer step `nan_step` on the last rank only (all ranks must skip)."""

        def __init__(self, nan_step: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.nan_step = nan_step

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = super().training_step(batch, batch_idx)
            if self.global_step == self.nan_step and self.global_rank == self.trainer.world_size - 1:
                loss = loss * float("nan")
            return loss

    return NaN


# the runs each strategy's process performs, in order (a later run may read an earlier one's checkpoint)
RUNS = {
    "plain": {},
    "accumulated": {"accumulate": 2},
    "sft_mean": {"sft_reduction": "mean", "accumulate": 2},
    "checkpointed_activations": {"activation_checkpointing": True},
    "saving": {"checkpoint_dir": "checkpoints"},
    "resumed": {"ckpt_path": f"checkpoints/step={CHECKPOINT_EVERY}.ckpt"},
    "nan_on_last_rank": {"nan_step": 2},
}


def main(argv: list[str]) -> None:
    strategy_name, devices, out, *runs = argv
    out = Path(out)
    for name in runs:
        options = dict(RUNS[name])
        for key in ("checkpoint_dir", "ckpt_path"):
            if key in options:
                options[key] = out / options[key]
        strategy = _strategy(strategy_name)
        result = train(strategy, int(devices), **options)
        if result["rank"] == 0:
            torch.save(result.pop("weights"), out / f"{name}.pt")
            (out / f"{name}.json").write_text(json.dumps(result))


def _strategy(name: str) -> Any:
    if name == "fsdp2":
        from moxin_lightning.strategies import FSDP2

        return FSDP2()
    return name


if __name__ == "__main__":
    main(sys.argv[1:])
