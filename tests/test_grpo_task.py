"""The GRPO task: on a task a tiny model can learn (answer each prompt with one token), GRPO raises the mean
reward from chance to at least 0.9; the step's gradient does not depend on how the rollouts are split."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from moxin_lightning.datamodules.pretrain import FixedBatches
from moxin_lightning.rewards import Reward
from moxin_lightning.tasks.grpo import GRPO

TINY = dict(
    vocab_size=16, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, max_seq_len=32,
    sliding_window=16,
)  # fmt: skip
PROMPTS = [3, 4, 5, 6]  # prompt [BOS, x]; the rewarded answer is the single token x + 6


class DigitTokenizer:
    """Ids as text: decode([9]) == "9" (the reward compares text)."""

    vocab_size, bos_id, eos_id, pad_id, fingerprint = 16, 1, 2, 0, "digits"

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + [int(t) for t in text.split()] + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(i) for i in ids)


class ExactAnswer(Reward):
    """1.0 when the completion is exactly the reference answer."""

    name = "exact"

    def __call__(self, completions: list[str], answers: list[str], prompts: list[str]) -> list[float]:
        return [float(c.strip() == a) for c, a in zip(completions, answers, strict=True)]


class Prompts(L.LightningDataModule):
    tokenizer = DigitTokenizer()

    def train_dataloader(self):
        batch = {
            "prompt_ids": [[1, x] for x in PROMPTS],
            "prompt_text": [str(x) for x in PROMPTS],
            "answer": [str(x + 6) for x in PROMPTS],
            "prompt_index": torch.arange(len(PROMPTS)),
        }
        return FixedBatches([batch] * 200)  # one loader (a plain list would be read as 200 loaders)


def grpo(**kwargs) -> GRPO:
    settings = dict(
        rewards=[ExactAnswer()], preset="moxin-tiny-9m", model_overrides=TINY, group_size=8, temperature=1.0,
        max_response_length=1, lr=3e-3, warmup_steps=0, schedule="constant", seed=0,
    )  # fmt: skip
    return GRPO(**{**settings, **kwargs})


def fit(task: GRPO, steps: int) -> list[float]:
    rewards = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rewards.append(trainer.callback_metrics["train/reward_mean"].item())

    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Record()],
    )  # fmt: skip
    trainer.fit(task, Prompts())
    return rewards


def test_grpo_raises_the_mean_reward_from_chance_to_above_0_9():
    rewards = fit(grpo(), steps=60)
    assert sum(rewards[:3]) / 3 < 0.3  # about 1/16 at the start
    assert sum(rewards[-5:]) / 5 >= 0.9, rewards


def test_the_step_does_not_depend_on_how_rollouts_are_split():
    """The gradient of an optimizer step (normalised by its global token count) is the same whether its 32
    rollouts go through one forward/backward or micro-batches of 3 (weights can't be compared: AdamW magnifies
    rounding-level gradient differences)."""
    whole, split = grpo(), grpo(micro_batch_size=3)
    fit(whole, steps=1)
    fit(split, steps=1)
    for (name, a), b in zip(whole.model.named_parameters(), split.model.parameters(), strict=True):
        assert a.grad is not None and a.grad.abs().max() > 0, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="group_size=1: group-relative advantages need at least 2 completions"):
        grpo(group_size=1)
    with pytest.raises(ValueError, match=r"^need advantage_eps >= 0, entropy_coeff >= 0 and kl_clamp > 0 \(or null\)"):
        grpo(kl_clamp=0.0)


def test_the_entropy_bonus_is_the_full_softmax_entropy_of_the_policy_with_its_gradient():
    """One pass on fixed rollouts (old log-probs are the current ones, ratio 1): the loss and the gradient with
    entropy_coeff equal -A * ratio - coeff * H per token computed from the model's full logits."""
    from moxin_lightning.tasks.grpo import Rollouts

    task = grpo(entropy_coeff=0.01)
    task.configure_model()
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 16, (4, 7), generator=g)
    labels = torch.full_like(input_ids, -100)
    labels[:, 2:6] = input_ids[:, 3:7]  # completion tokens at the positions that predict them
    labels[3, 4:] = -100  # a shorter completion
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss_sum, count, stats = task._surrogate(Rollouts(input_ids, labels, advantages, None, None), slice(None))
    loss_sum.backward()
    ours = [p.grad.clone() for p in task.model.parameters()]
    task.model.zero_grad()

    scored = labels != -100
    log_p = torch.log_softmax(task.model(input_ids).float(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    target_logp = log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(target_logp - target_logp.detach())
    expected = ((-advantages.unsqueeze(1) * ratio - 0.01 * entropy) * scored).sum()
    expected.backward()
    assert count.item() == scored.sum().item() == 14
    torch.testing.assert_close(loss_sum, expected, atol=1e-5, rtol=0)
    assert stats["entropy"].item() == pytest.approx(entropy[scored].mean().item(), abs=1e-5)
    for got, want in zip(ours, (p.grad for p in task.model.parameters()), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_rollouts_run_in_budgeted_slots_with_one_prefill_per_prompt_and_log_engine_stats():
    """4 prompts x 8 completions of up to 3 tokens in the 4 slots a 5-row budget holds (one row stages the
    prefill): each prompt is prefilled once, and the step logs the engine's numbers."""
    from moxin_lightning.model import RollingKVCache

    probe = grpo()
    row = RollingKVCache.bytes_per_row(probe.model_config, 2 + 3, torch.float32)
    task = grpo(max_response_length=3, rollout_kv_budget_bytes=5 * row)
    metrics = {}

    class Keep(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics.update({k: v.item() for k, v in trainer.callback_metrics.items()})

    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Keep()],
    )  # fmt: skip
    trainer.fit(task, Prompts())
    assert metrics["train/rollout_slots"] == 4 and metrics["train/prefill_tokens"] == 2 * len(PROMPTS)
    assert 0 < metrics["train/slot_occupancy"] <= 1
    assert metrics["train/generation_tokens_per_s"] > 0 and 0 < metrics["train/generation_share"] < 1


def test_grpo_yaml_optimises_as_verl_ran_deepscaler():
    """AdamW (0.9, 0.999) with weight decay 0.01 on every parameter, the entropy bonus, the clamped KL and the
    advantage epsilon of veRL (agentica-project/deepscaler ran it): each marked [Moxin]."""
    from tests.test_cli import ROOT, configs, printed_config

    path = ROOT / "conf" / "grpo.yaml"
    model = printed_config(*configs(path))["model"]["init_args"]
    assert (model["betas"], model["weight_decay"], model["weight_decay_scope"]) == ([0.9, 0.999], 0.01, "all")
    assert (model["entropy_coeff"], model["kl_clamp"], model["advantage_eps"]) == (0.001, 10.0, 1e-6)
    lines = {line.split(":")[0].strip(): line for line in path.read_text().splitlines() if ":" in line}
    for key in ("betas", "weight_decay", "weight_decay_scope", "entropy_coeff", "kl_clamp", "advantage_eps"):
        assert "# [Moxin]" in lines[key], lines[key]
