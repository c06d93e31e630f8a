"""The DPO task: reward accuracy rises on its training pairs, the frozen and the cached reference agree, the
cache is keyed by the starting weights and the data, and the reference never enters checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from moxin_lightning.tasks import DPO

TINY = dict(
    vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, max_seq_len=64,
    sliding_window=32,
)  # fmt: skip
PROMPT, RESPONSE = 6, 4


def pair(index: int) -> dict[str, torch.Tensor]:
    """A prompt of random tokens; the chosen response draws from ids 40..47, the rejected one from 48..55."""
    g = torch.Generator().manual_seed(index)
    prompt = torch.randint(3, 40, (PROMPT,), generator=g)
    chosen = torch.cat([prompt, torch.randint(40, 48, (RESPONSE,), generator=g)])
    rejected = torch.cat([prompt, torch.randint(48, 56, (RESPONSE + index % 3,), generator=g)])

    def labels(ids: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(ids, -100)
        out[PROMPT - 1 : -1] = ids[PROMPT:]  # next-token labels on the response only
        return out

    return {
        "chosen": chosen,
        "chosen_labels": labels(chosen),
        "rejected": rejected,
        "rejected_labels": labels(rejected),
    }


def collate(indices: list[int]) -> dict[str, torch.Tensor]:
    pairs = [pair(i) for i in indices]

    def stack(key: str, fill: int) -> torch.Tensor:
        length = max(len(p[key]) for p in pairs)
        return torch.stack([torch.nn.functional.pad(p[key], (0, length - len(p[key])), value=fill) for p in pairs])

    return {
        "chosen_input_ids": stack("chosen", 0),
        "chosen_labels": stack("chosen_labels", -100),
        "rejected_input_ids": stack("rejected", 0),
        "rejected_labels": stack("rejected_labels", -100),
        "pair_index": torch.tensor(indices),
    }


class Pairs(L.LightningDataModule):
    def __init__(self, count: int = 16, batch_size: int = 8, tag: str = "a") -> None:
        super().__init__()
        self.count, self.batch_size, self.fingerprint = count, batch_size, f"pairs-{count}-{tag}"

    def train_dataloader(self):
        return torch.utils.data.DataLoader(list(range(self.count)), batch_size=self.batch_size, collate_fn=collate)

    def ordered_dataloader(self, split: str = "train", rank: int = 0, world_size: int = 1):
        return self.train_dataloader()

    def pair_count(self, split: str = "train") -> int:
        return self.count

    def val_dataloader(self):
        return []


def dpo(**kwargs) -> DPO:
    settings = dict(preset="moxin-tiny-9m", model_overrides=TINY, lr=5e-3, warmup_steps=0, beta=0.5, seed=0)
    return DPO(**{**settings, **kwargs})


def fit(task: DPO, data: Pairs, steps: int, **kwargs) -> list[dict[str, float]]:
    seen = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append({k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("train/")})

    settings = dict(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Record()],
    )  # fmt: skip
    trainer = L.Trainer(**{**settings, **kwargs})
    trainer.fit(task, data)
    return seen


def reward_accuracy(task: DPO, data: Pairs) -> float:
    batch = collate(list(range(data.count)))
    with torch.no_grad():
        chosen, rejected, _, _ = task.pair_logps(task.model, batch)
        ref_chosen, ref_rejected, _, _ = task.pair_logps(task.build_model(trainable=False), batch)
    return ((chosen - ref_chosen) > (rejected - ref_rejected)).float().mean().item()


@pytest.mark.parametrize("loss_type", ["sigmoid", "dpo_norm"])
def test_a_few_steps_raise_reward_accuracy_on_the_training_pairs_above_0_9(loss_type):
    task, data = dpo(loss_type=loss_type), Pairs()
    history = fit(task, data, steps=12)
    assert history[0]["train/rewards_accuracy"] <= 0.75  # the policy starts as the reference: no preference yet
    assert history[0]["train/rewards_margin"] == pytest.approx(0.0, abs=1e-6)
    assert reward_accuracy(task, data) > 0.9
    assert history[-1]["train/loss"] < history[0]["train/loss"] - 0.1


def test_cached_reference_equals_the_frozen_model_and_is_keyed_by_model_and_data(tmp_path):
    frozen = fit(dpo(reference="model"), Pairs(), steps=3)
    cached = fit(dpo(reference="cache", cache_dir=str(tmp_path)), Pairs(), steps=3)
    for a, b in zip(frozen, cached, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
        assert a["train/rewards_margin"] == pytest.approx(b["train/rewards_margin"], abs=1e-5)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    fit(dpo(reference="cache", cache_dir=str(tmp_path)), Pairs(), steps=1)  # same model, same data: reused
    assert len(list(tmp_path.glob("*.pt"))) == 1
    fit(dpo(reference="cache", cache_dir=str(tmp_path)), Pairs(tag="b"), steps=1)  # other data: recomputed
    fit(dpo(reference="cache", cache_dir=str(tmp_path), seed=1), Pairs(), steps=1)  # other starting weights
    assert len(list(tmp_path.glob("*.pt"))) == 3
    assert not list(tmp_path.glob(".*"))  # written atomically, nothing left behind


def test_the_reference_is_frozen_and_never_saved(tmp_path):
    task = dpo()
    fit(task, Pairs(), steps=2, enable_checkpointing=True, default_root_dir=tmp_path)
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    keys = torch.load(checkpoint, weights_only=True)["state_dict"].keys()
    assert keys and all(key.startswith("model.") for key in keys)
    assert not any(p.requires_grad for p in task._reference.parameters())


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="reference='disk'; choose model"):
        dpo(reference="disk")
    with pytest.raises(ValueError, match="beta=0 must be > 0"):
        dpo(beta=0)
