"""`SFT`: supervised fine-tuning on chat data (Moxin-Instruct's first stage, Tülu 3 recipe)."""

from __future__ import annotations

from typing import Any, Literal

import torch

from moxin_lightning.losses import IGNORE_INDEX
from moxin_lightning.tasks.base import TrainingTask


class SFT(TrainingTask):
    """Next-token loss on assistant tokens only (`moxin_lightning.datamodules.ChatData` labels nothing else).

    Args:
        loss_reduction: `sum` (Tülu 3's and Moxin's setting): every assistant token weighs the same, the step's loss
            is the sum over its tokens divided by their global count; `mean`: each conversation's mean token loss,
            averaged over the step's global count of conversations (long answers weigh no more than short ones).
            Both are normalised over all micro-batches and ranks of the optimizer step, so neither depends on
            gradient accumulation or the number of processes.
        **kwargs: the shared settings of `TrainingTask` (preset, init_from, lr, schedule, ...); `conf/sft.yaml`
            sets Moxin-Instruct's.
    """

    reports_perplexity = True

    def __init__(self, loss_reduction: Literal["sum", "mean"] = "sum", **kwargs: Any) -> None:
        if loss_reduction not in ("sum", "mean"):
            raise ValueError(f"loss_reduction={loss_reduction!r}; choose sum (per token) or mean (per conversation)")
        super().__init__(**kwargs)
        self.loss_reduction = loss_reduction

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        weights, count = None, None
        if self.loss_reduction == "mean":
            weights, count = per_conversation_weights(labels, batch["doc_ids"])
        loss_sum, tokens = self.model(
            batch["input_ids"],
            doc_ids=batch["doc_ids"],
            positions=batch.get("positions"),
            targets=labels,
            target_weights=weights,
        )
        return loss_sum, tokens if count is None else count


def per_conversation_weights(labels: torch.Tensor, doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1 / (labelled tokens of its conversation) for every token, and the number of conversations with any.

    Weighting each token's loss so turns the token sum into a sum of per-conversation means."""
    labelled = labels != IGNORE_INDEX
    rows, length = labels.shape
    span = int(doc_ids.max()) + 1 if doc_ids.numel() else 1
    key = (torch.arange(rows, device=labels.device).unsqueeze(1) * span + doc_ids).reshape(-1)
    counts = torch.bincount(key[labelled.reshape(-1)], minlength=rows * span)
    weights = torch.where(labelled.reshape(-1), 1.0 / counts[key].clamp(min=1), 0.0).reshape(rows, length)
    return weights, (counts > 0).sum()
