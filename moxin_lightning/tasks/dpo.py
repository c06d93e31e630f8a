"""`DPO`: direct preference optimisation on the shared backbone (Moxin-Instruct's second stage).

The loss is `losses.dpo_loss` on per-sequence sums of response-token log-probs of the policy and of a
reference. The reference is the starting point of the policy, either kept as a frozen model
(`reference: model`) or scored once before training and cached on disk (`reference: cache`), keyed by a hash of
the starting weights and of the data (which covers the chat template and the maximum length); a change in any
of them recomputes it, and the cached run holds no second model in memory.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from moxin_lightning.atomic import remove_stale_temporaries, written_file
from moxin_lightning.first_use import cache_root
from moxin_lightning.losses import IGNORE_INDEX, dpo_loss
from moxin_lightning.model.transformer import Transformer
from moxin_lightning.release.contents import Panel
from moxin_lightning.tasks.base import TrainingTask


class DPO(TrainingTask):
    """Preference optimisation on `moxin_lightning.datamodules.PreferenceData` batches.

    Args:
        beta: strength of the implicit KL constraint (Moxin-Instruct: 5 with `dpo_norm`).
        loss_type: `sigmoid` (DPO), `ipo`, or `dpo_norm` (length-normalised, Tülu 3's default).
        reference: `model` (a frozen copy of the starting weights) or `cache` (reference log-probs computed once
            and stored under `cache_dir`).
        cache_dir: where cached reference log-probs live (default `$MOXIN_CACHE/reference_logps`).
        **kwargs: the shared settings of `TrainingTask`; `conf/dpo.yaml` sets Moxin's.
    """

    batch_keys = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "pair_index")
    release_panels = (
        *TrainingTask.release_panels,
        Panel("reward_accuracy", "reward accuracy", ("train/rewards_accuracy", "val/rewards_accuracy")),
        Panel("reward_margin", "reward margin (chosen - rejected)", ("train/rewards_margin", "val/rewards_margin")),
    )

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "ipo", "dpo_norm"] = "sigmoid",
        reference: Literal["model", "cache"] = "model",
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        if reference not in ("model", "cache"):
            raise ValueError(f"reference={reference!r}; choose model (a frozen copy) or cache (log-probs on disk)")
        if beta <= 0:
            raise ValueError(f"beta={beta} must be > 0")
        super().__init__(**kwargs)
        self.beta, self.loss_type, self.reference_kind = beta, loss_type, reference
        self.cache_dir = Path(cache_dir) if cache_dir else cache_root() / "reference_logps"
        self._reference: Transformer | None = None  # kept out of the module tree: never saved, never trained
        self._cached: dict[str, torch.Tensor] = {}  # split -> (pairs, 2) reference log-probs of chosen, rejected

    def configure_model(self) -> None:
        super().configure_model()
        if self.reference_kind == "model" and self._reference is None:
            object.__setattr__(self, "_reference", self.build_model(trainable=False))

    def on_fit_start(self) -> None:
        """Score the reference once per split, before the first step changes the policy (the reference)."""
        if self.reference_kind != "cache" or self._cached:
            return
        data = self.trainer.datamodule
        if not hasattr(data, "ordered_dataloader"):  # the cache reads pairs before the first batch check
            raise ValueError(
                f"DPO with reference: cache needs preference pairs ({', '.join(self.batch_keys)}); "
                f"{type(data).__name__} gives none: pair the task with moxin_lightning.datamodules.PreferenceData"
            )
        splits = ["train"] + (["val"] if len(data.val_dataloader()) else [])
        self._cached = {split: self._cached_reference(data, split) for split in splits}

    # -- log-probs ------------------------------------------------------------------------------------------

    @staticmethod
    def pair_logps(model: Transformer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Summed response log-probs and response lengths of chosen and rejected, in one forward."""
        chosen, rejected = batch["chosen_input_ids"], batch["rejected_input_ids"]
        length = max(chosen.shape[1], rejected.shape[1])
        inputs = torch.cat([_pad(chosen, length, 0), _pad(rejected, length, 0)])
        labels = torch.cat([_pad(batch["chosen_labels"], length), _pad(batch["rejected_labels"], length)])
        token_logps = model(inputs, targets=labels, target_logprobs=True)
        sums, lengths = token_logps.sum(-1), (labels != IGNORE_INDEX).sum(-1)
        rows = chosen.shape[0]
        return sums[:rows], sums[rows:], lengths[:rows], lengths[rows:]

    def _reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference_kind == "cache":
            split = "train" if self.training else "val"
            if split not in self._cached:
                raise ValueError(f"no cached reference log-probs for the {split} pairs; DPO scores them at fit start")
            table = self._cached[split].to(batch["pair_index"].device)[batch["pair_index"]]
            return table[:, 0], table[:, 1]
        with torch.no_grad():
            chosen, rejected, _, _ = self.pair_logps(self._reference, batch)
        return chosen, rejected

    def batch_work(self, batch: dict[str, torch.Tensor]) -> tuple[int, float]:
        """Tokens and model FLOPs of a training batch, for `TrainingSpeed` (whose default reads `input_ids`): the
        chosen and rejected rows as `pair_logps` runs them, padded to one length, forward and backward; a frozen
        reference adds a forward over the same rows (a third of the training FLOPs), a cached one nothing."""
        chosen, rejected = batch["chosen_input_ids"], batch["rejected_input_ids"]
        length = max(chosen.shape[1], rejected.shape[1])
        tokens = (chosen.shape[0] + rejected.shape[0]) * length
        passes = 1 + (1 / 3 if self.reference_kind == "model" else 0)
        return tokens, tokens * self.model_config.flops_per_token(length) * passes

    # -- loss ----------------------------------------------------------------------------------------------

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, rejected, chosen_lengths, rejected_lengths = self.pair_logps(self.model, batch)
        ref_chosen, ref_rejected = self._reference_logps(batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=self.beta,
            loss_type=self.loss_type,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
        )
        stage = "train" if self.training else "val"
        margin = (chosen_rewards - rejected_rewards).detach()
        # Validation's epoch means cover every process's pairs (sync_dist), as val/loss does.
        when = dict(on_step=self.training, on_epoch=not self.training, sync_dist=not self.training)
        self.log(f"{stage}/rewards_chosen", chosen_rewards.mean(), **when)
        self.log(f"{stage}/rewards_rejected", rejected_rewards.mean(), **when)
        self.log(f"{stage}/rewards_margin", margin.mean(), **when)
        self.log(f"{stage}/rewards_accuracy", (margin > 0).float().mean(), **when)
        return losses.sum(), torch.tensor(losses.numel(), device=losses.device)

    # -- the cached reference ------------------------------------------------------------------------------

    def _cache_key(self, data_fingerprint: str) -> str:
        """Hash of the starting weights (this runs before the first step) and of the tokenized pairs, which
        covers the chat template, the maximum length and the tokenizer."""
        state = self.full_state_dict()
        digest = hashlib.sha256()
        for name in sorted(state):
            digest.update(name.encode())
            digest.update(state[name].float().numpy().tobytes())
        digest.update(str(data_fingerprint).encode())
        key = digest.hexdigest()[:24] if state else ""
        return self.trainer.strategy.broadcast(key)

    def _cached_reference(self, data: Any, split: str) -> torch.Tensor:
        """The split's reference log-probs: read from the cache, or scored now and cached. Either way one line
        says so on the console, and scoring (minutes on a large set, with no bar of its own) says it is starting."""
        fingerprint = data.split_fingerprint(split) if hasattr(data, "split_fingerprint") else data.fingerprint
        path = self.cache_dir / f"{self._cache_key(fingerprint)}.pt"
        if path.is_file():
            table = torch.load(path, weights_only=True)
            rank_zero_info(f"DPO: reusing the reference log-probs of {len(table):,} {split} pairs cached in {path}")
            return table
        pairs, world = data.pair_count(split), self.trainer.world_size
        processes = f" on {world} processes" if world > 1 else ""
        rank_zero_info(f"DPO: scoring the reference on {pairs:,} {split} pairs{processes} (once, then cached)")
        started = time.perf_counter()
        table = self._score_reference(data, split, pairs)
        if self.trainer.is_global_zero:
            remove_stale_temporaries(path)
            with written_file(path) as temporary:
                torch.save(table, temporary)
        self.trainer.strategy.barrier("reference log-probs cached")
        seconds = time.perf_counter() - started
        rank_zero_info(f"DPO: scored the reference on {pairs:,} {split} pairs in {seconds:.1f} s; cached in {path}")
        return table

    def _score_reference(self, data: Any, split: str, pairs: int) -> torch.Tensor:
        """(pairs, 2) log-probs of chosen and rejected under the starting weights; each process scores its share."""
        table = torch.full((pairs, 2), float("nan"), device=self.device)
        was_training = self.model.training
        self.model.eval()
        world, rank = self.trainer.world_size, self.trainer.global_rank
        with torch.no_grad():
            for batch in data.ordered_dataloader(split, rank=rank, world_size=world):  # this process's share
                batch = self.transfer_batch_to_device(batch, self.device, 0)
                chosen, rejected, _, _ = self.pair_logps(self.model, batch)
                table[batch["pair_index"]] = torch.stack([chosen, rejected], dim=1).float()
        self.model.train(was_training)
        if world > 1:  # every pair was scored by one process (or two, identically, where shares were padded)
            table = self.all_gather(table).nanmean(dim=0)
        table = table.cpu()
        if torch.isnan(table).any():
            raise ValueError(f"reference log-probs are missing for some {split} pairs; the data loader skipped them")
        return table


def _pad(tensor: torch.Tensor, length: int, value: int = IGNORE_INDEX) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=value)
