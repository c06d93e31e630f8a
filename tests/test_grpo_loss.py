"""grpo_loss and group_advantages against TRL 1.16's GRPOTrainer, against hand-worked values, and split-invariance.

TRL has no standalone GRPO loss: the math sits inside `GRPOTrainer._compute_loss`, after the model forward.
`TrlLoss` runs that method unchanged with `self` a stand-in holding the attributes it reads; TRL's own
`_get_per_token_logps_and_entropies` (bound to the stand-in) calls a stub model whose per-token log-probs
are our `logps` (after a prompt), so TRL's loss sees exactly our tensors and its gradient reaches them.
TRL's advantages are a block inside the long `_generate_and_score_completions`; `trl_advantages` runs that
block's installed source text as is, on our rewards.
"""

import contextlib
import functools
import inspect
import math
import textwrap
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from moxin_lightning.losses import group_advantages, grpo_loss

GROUP_SIZE = 4
PROMPT_TOKENS = 3


def rollout_batch(seed, groups=3, tokens=12, dtype=torch.float32):
    """Per-token log-probs of groups x GROUP_SIZE completions of lengths 1..tokens, with ratios far enough
    from 1 that both clip sides are hit, and group-relative advantages of random 0/1 rewards."""
    g = torch.Generator().manual_seed(seed)
    batch = groups * GROUP_SIZE
    lengths = torch.randint(1, tokens + 1, (batch,), generator=g)
    mask = (torch.arange(tokens) < lengths.unsqueeze(1)).long()
    old_logps = -3 * torch.rand(batch, tokens, generator=g)
    logps = old_logps + 0.3 * torch.randn(batch, tokens, generator=g)
    ref_logps = logps + 0.2 * torch.randn(batch, tokens, generator=g)
    rewards = (torch.rand(batch, generator=g) < 0.5).float()
    advantages = group_advantages(rewards, GROUP_SIZE)
    return [t.to(dtype) for t in (logps, old_logps, advantages, ref_logps)] + [mask]


class TrlLoss:
    """Calls TRL 1.16's `GRPOTrainer._compute_loss` on one micro-batch (no accumulation, one process)."""

    def __init__(self, loss_type, beta, epsilon_low=0.2, epsilon_high=0.2, max_completion_length=None):
        trainer_class = pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer
        self.compute_loss = trainer_class._compute_loss
        self.trainer = SimpleNamespace(
            model=SimpleNamespace(training=True),
            accelerator=SimpleNamespace(
                num_processes=1,
                is_main_process=True,
                autocast=contextlib.nullcontext,
                gather=_same,
                reduce=lambda tensor, reduction: tensor,
            ),
            args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
            aux_loss_enabled=False,
            top_entropy_quantile=1.0,
            off_policy_mask_threshold=None,
            importance_sampling_level="token",
            use_vllm=False,
            loss_type=loss_type,
            beta=beta,
            epsilon_low=epsilon_low,
            epsilon_high=epsilon_high,
            max_completion_length=max_completion_length,
            current_gradient_accumulation_steps=1,
            _entropy_bonus_enabled=False,
            _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        )
        self.trainer._get_per_token_logps_and_entropies = functools.partial(
            trainer_class._get_per_token_logps_and_entropies, self.trainer
        )

    def __call__(self, logps, old_logps, advantages, ref_logps, mask):
        """TRL's loss and its logged metrics; gradients flow into `logps`."""
        batch, tokens = logps.shape
        prompt = torch.ones(batch, PROMPT_TOKENS, dtype=torch.long)
        per_token = torch.cat([logps.new_zeros(batch, PROMPT_TOKENS), logps], dim=1)

        def stub_model(input_ids, attention_mask, labels, **_):
            assert input_ids.shape == labels.shape == (batch, PROMPT_TOKENS + tokens)
            return SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token))

        inputs = {
            "prompt_ids": prompt,
            "prompt_mask": torch.ones_like(prompt),
            "completion_ids": torch.ones(batch, tokens, dtype=torch.long),
            "completion_mask": mask,
            "advantages": advantages,
            "old_per_token_logps": old_logps,
            "ref_per_token_logps": ref_logps,
            "num_items_in_batch": mask.sum(),
        }
        loss = self.compute_loss(self.trainer, stub_model, inputs)
        metrics = {name: values[-1] for name, values in self.trainer._metrics["train"].items()}
        return loss, metrics


def _same(tensor):
    return tensor


# TRL 1.16's clipped-surrogate loss types and our aggregation for each (on one micro-batch "bnpo" and "dapo"
# both divide by the micro-batch's tokens; across micro-batches "dapo" is the globally normalised one).
TRL_VARIANTS = [
    ("dapo", "token_mean"),
    ("bnpo", "token_mean"),
    ("grpo", "seq_mean_token_mean"),
    ("dr_grpo", "seq_mean_token_sum_norm"),
]
MAX_COMPLETION_LENGTH = 16


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize(("trl_type", "loss_agg"), TRL_VARIANTS)
def test_loss_gradients_and_metrics_equal_trl(trl_type, loss_agg, beta, seed):
    logps, old_logps, advantages, ref_logps, mask = rollout_batch(seed)
    ours_logps = logps.clone().requires_grad_()
    loss_sum, count, stats = grpo_loss(
        ours_logps,
        old_logps,
        advantages,
        mask,
        ref_logps=ref_logps,
        beta=beta,
        loss_agg=loss_agg,
        max_completion_length=MAX_COMPLETION_LENGTH,
    )
    ours = loss_sum / count
    (our_grad,) = torch.autograd.grad(ours, ours_logps)

    trl_logps = logps.clone().requires_grad_()
    trl = TrlLoss(trl_type, beta, max_completion_length=MAX_COMPLETION_LENGTH)
    trl_loss, metrics = trl(trl_logps, old_logps, advantages, ref_logps, mask)
    (trl_grad,) = torch.autograd.grad(trl_loss, trl_logps)

    expected_count = mask.sum() if loss_agg == "token_mean" else len(mask)
    assert count.item() == expected_count and count.dtype == torch.long
    torch.testing.assert_close(ours, trl_loss, atol=1e-6, rtol=0)
    assert trl_grad.abs().max() > 0 and (trl_grad[mask == 0] == 0).all()
    torch.testing.assert_close(our_grad, trl_grad, atol=1e-6, rtol=0)
    assert stats["clip_fraction_low"].item() == pytest.approx(metrics["clip_ratio/low_mean"], abs=1e-7)
    assert stats["clip_fraction_high"].item() == pytest.approx(metrics["clip_ratio/high_mean"], abs=1e-7)
    assert stats["clip_fraction"].item() == pytest.approx(metrics["clip_ratio/region_mean"], abs=1e-7)
    assert stats["clip_fraction_low"] > 0 and stats["clip_fraction_high"] > 0  # the batch exercises both sides
    if beta > 0:
        assert stats["kl"].item() == pytest.approx(metrics["kl"], abs=1e-6)
    else:
        assert "kl" not in stats and "kl" not in metrics
    assert not any(value.requires_grad for value in stats.values())


@pytest.mark.parametrize(("trl_type", "loss_agg"), [("grpo", "seq_mean_token_mean"), ("dapo", "token_mean")])
def test_asymmetric_clipping_equals_trls_epsilon_high(trl_type, loss_agg):
    """DAPO's clip-higher: clip_low=0.2, clip_high=0.28 is TRL's epsilon=0.2, epsilon_high=0.28."""
    logps, old_logps, advantages, ref_logps, mask = rollout_batch(seed=5)
    logps.requires_grad_()
    loss_sum, count, stats = grpo_loss(
        logps, old_logps, advantages, mask, clip_low=0.2, clip_high=0.28, loss_agg=loss_agg
    )
    (our_grad,) = torch.autograd.grad(loss_sum / count, logps)
    trl_loss, metrics = TrlLoss(trl_type, 0.0, epsilon_high=0.28)(logps, old_logps, advantages, ref_logps, mask)
    (trl_grad,) = torch.autograd.grad(trl_loss, logps)
    torch.testing.assert_close(loss_sum / count, trl_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(our_grad, trl_grad, atol=1e-6, rtol=0)
    assert stats["clip_fraction_high"].item() == pytest.approx(metrics["clip_ratio/high_mean"], abs=1e-7)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_summing_micro_batches_gives_the_whole_batch_objective(loss_agg):
    """What the task base does over an optimizer step: sum loss_sum and count over uneven micro-batches,
    divide once. The result, and its gradient, equal the whole batch's in one call."""
    logps, old_logps, advantages, ref_logps, mask = rollout_batch(seed=3, groups=4, dtype=torch.float64)
    kwargs = {"beta": 0.04, "loss_agg": loss_agg, "max_completion_length": MAX_COMPLETION_LENGTH}
    whole_logps = logps.clone().requires_grad_()
    whole_sum, whole_count, _ = grpo_loss(whole_logps, old_logps, advantages, mask, ref_logps=ref_logps, **kwargs)
    whole = whole_sum / whole_count
    (whole_grad,) = torch.autograd.grad(whole, whole_logps)

    split_logps = logps.clone().requires_grad_()
    sums, counts = [], []
    for rows in (slice(0, 1), slice(1, 6), slice(6, 16)):
        part = grpo_loss(
            split_logps[rows], old_logps[rows], advantages[rows], mask[rows], ref_logps=ref_logps[rows], **kwargs
        )
        sums.append(part[0])
        counts.append(part[1])
    split = torch.stack(sums).sum() / torch.stack(counts).sum()
    (split_grad,) = torch.autograd.grad(split, split_logps)
    torch.testing.assert_close(split, whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(split_grad, whole_grad, atol=1e-12, rtol=0)


def test_aggregations_written_out_longhand():
    """Two completions with token losses [1, 2, 3] and [4] (the last position of row 2 is padding)."""
    token_losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # with advantage -1 and clipping off, a token's loss is its ratio: logps = log(loss) over old_logps = 0
    logps = token_losses.log()
    zeros = torch.zeros_like(logps)
    advantages = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    unclipped = {"clip_low": 0.0, "clip_high": 1e9}
    results = {
        agg: grpo_loss(logps, zeros, advantages, mask, loss_agg=agg, max_completion_length=8, **unclipped)
        for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
    }
    loss_sum, count, stats = results["token_mean"]
    assert (loss_sum.item(), count.item()) == pytest.approx((10.0, 4))
    loss_sum, count, _ = results["seq_mean_token_mean"]
    assert (loss_sum.item(), count.item()) == pytest.approx((2.0 + 4.0, 2))
    loss_sum, count, _ = results["seq_mean_token_sum_norm"]
    assert (loss_sum.item(), count.item()) == pytest.approx((10.0 / 8, 2))
    assert stats["ratio_mean"].item() == pytest.approx(10.0 / 4)
    assert stats["tokens"].item() == 4 and stats["clip_fraction"].item() == 0.0


def test_clipping_and_k3_kl_known_values():
    """Four one-token completions: ratio e^0.5 with A=+1 is clipped at 1.2 (high); e^-0.5 with A=-1 is clipped
    at 0.8 (low); e^0.1 with A=+1 and e^0.5 with A=-1 are not clipped (the min picks the unclipped term)."""
    logps = torch.tensor([[0.5], [-0.5], [0.1], [0.5]], dtype=torch.float64) - 2.0
    old_logps = torch.full_like(logps, -2.0)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(4, 1)
    loss_sum, count, stats = grpo_loss(logps, old_logps, advantages, mask)
    expected = [-1.2, 0.8, -math.exp(0.1), math.exp(0.5)]
    assert loss_sum.item() == pytest.approx(sum(expected), abs=1e-12) and count.item() == 4
    assert stats["clip_fraction_high"].item() == 0.25 and stats["clip_fraction_low"].item() == 0.25
    assert stats["clip_fraction"].item() == 0.5
    assert stats["ratio_mean"].item() == pytest.approx((2 * math.exp(0.5) + math.exp(-0.5) + math.exp(0.1)) / 4)

    # k3 with ref - logps = log 2: 2 - log 2 - 1; equal log-probs: 0
    ref_logps = logps.clone()
    ref_logps[0] += math.log(2.0)
    with_kl, _, stats = grpo_loss(logps, old_logps, advantages, mask, ref_logps=ref_logps, beta=0.5)
    kl_first = 2.0 - math.log(2.0) - 1.0
    assert with_kl.item() == pytest.approx(sum(expected) + 0.5 * kl_first, abs=1e-12)
    assert stats["kl"].item() == pytest.approx(kl_first / 4, abs=1e-12)


def test_kl_clamp_bounds_the_k3_term_as_verls_low_var_kl():
    """Two tokens: ref - logps = log 100 gives k3 = 100 - log 100 - 1 = 94.4, clamped to 10 with no gradient;
    ref - logps = log 2 gives 0.307, inside the bound, unchanged."""
    logps = torch.tensor([[-5.0, -1.0]], dtype=torch.float64, requires_grad=True)
    ref_logps = logps.detach() + torch.tensor([[math.log(100.0), math.log(2.0)]], dtype=torch.float64)
    zeros, mask, advantages = torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2), torch.zeros(1)
    loss_sum, _, stats = grpo_loss(
        logps, logps.detach(), advantages, mask, ref_logps=ref_logps, beta=1.0, kl_clamp=10.0
    )
    small = 2.0 - math.log(2.0) - 1.0
    assert loss_sum.item() == pytest.approx(10.0 + small, abs=1e-12)
    assert stats["kl"].item() == pytest.approx((10.0 + small) / 2, abs=1e-12)
    loss_sum.backward()
    # d k3 / d logps = 1 - exp(ref - logps): 0 where clamped, 1 - 2 = -1 inside
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, -1.0]], dtype=torch.float64))
    unclamped, _, _ = grpo_loss(logps.detach(), zeros + logps.detach(), advantages, mask, ref_logps=ref_logps, beta=1.0)
    assert unclamped.item() == pytest.approx(100.0 - math.log(100.0) - 1.0 + small, abs=1e-9)


def test_the_entropy_bonus_lowers_each_scored_tokens_loss_by_coeff_times_its_entropy():
    logps, old_logps, advantages, _, mask = rollout_batch(seed=5, dtype=torch.float64)
    entropy = torch.rand(logps.shape, generator=torch.Generator().manual_seed(6), dtype=logps.dtype) * 3
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        options = dict(loss_agg=agg, max_completion_length=16)
        base, count, _ = grpo_loss(logps, old_logps, advantages, mask, **options)
        bonus, same_count, stats = grpo_loss(
            logps, old_logps, advantages, mask, entropy=entropy, entropy_coeff=0.001, **options
        )
        # the bonus alone, aggregated the same way: the loss of zero advantages with the same entropies
        only_bonus, _, _ = grpo_loss(
            logps, old_logps, torch.zeros_like(advantages), mask, entropy=entropy, entropy_coeff=0.001, **options
        )
        assert same_count == count
        assert bonus.item() == pytest.approx(base.item() + only_bonus.item(), abs=1e-9)
        scored = mask.bool()
        assert stats["entropy"].item() == pytest.approx(entropy[scored].mean().item(), abs=1e-9)
    token_bonus, _, _ = grpo_loss(
        logps, old_logps, torch.zeros_like(advantages), mask, entropy=entropy, entropy_coeff=0.001
    )
    assert token_bonus.item() == pytest.approx(-0.001 * entropy[mask.bool()].sum().item(), abs=1e-9)


def test_a_row_with_no_scored_token_counts_as_a_sequence_with_zero_loss():
    logps, old_logps, advantages, _, mask = rollout_batch(seed=2)
    mask[0] = 0
    for agg in ("seq_mean_token_mean", "seq_mean_token_sum_norm"):
        loss_sum, count, _ = grpo_loss(logps, old_logps, advantages, mask, loss_agg=agg, max_completion_length=16)
        rest_sum, _, _ = grpo_loss(
            logps[1:], old_logps[1:], advantages[1:], mask[1:], loss_agg=agg, max_completion_length=16
        )
        assert count.item() == len(mask) and loss_sum.item() == pytest.approx(rest_sum.item(), abs=1e-6)
    loss_sum, count, stats = grpo_loss(logps, old_logps, advantages, torch.zeros_like(mask))
    assert (loss_sum.item(), count.item(), stats["ratio_mean"].item(), stats["tokens"].item()) == (0.0, 0, 0.0, 0)


def trl_advantages(rewards, num_generations, scale_rewards):
    """TRL 1.16's advantage block (sum_then_normalize), run from the installed source on our rewards."""
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    source = textwrap.dedent(inspect.getsource(grpo_trainer.GRPOTrainer._generate_and_score_completions))
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("mean_grouped_rewards = torch.nanmean"))
    end = next(i for i in range(start, len(lines)) if lines[i].strip().startswith("is_std_zero ="))
    names = {
        "self": SimpleNamespace(scale_rewards=scale_rewards),
        "rewards": rewards,
        "num_generations": num_generations,
    }
    exec(textwrap.dedent("\n".join(lines[start:end])), {"torch": torch, "nanstd": grpo_trainer.nanstd}, names)
    return names["advantages"]


@pytest.mark.parametrize("group_size", [1, 4, 6])
@pytest.mark.parametrize(("scale", "trl_scale"), [("group_std", "group"), ("batch_std", "batch"), ("none", "none")])
def test_group_advantages_equal_trl(scale, trl_scale, group_size):
    g = torch.Generator().manual_seed(group_size)
    rewards = torch.cat([torch.rand(12, generator=g) * 3, (torch.rand(12, generator=g) < 0.5).float()])
    rewards[:group_size] = 1.0  # a group with no spread: advantage 0, not a division by zero
    ours = group_advantages(rewards, group_size, scale=scale)
    expected = trl_advantages(rewards, group_size, trl_scale)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)
    assert (ours[:group_size] == 0).all()


def test_group_advantages_known_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 4.0, 4.0], dtype=torch.float64)
    # group 1: mean 0.25, unbiased std 0.5; group 2: mean 3, unbiased std sqrt(4/3)
    group = group_advantages(rewards, 4)
    expected = [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001]
    expected += [x / (math.sqrt(4 / 3) + 1e-4) for x in (-1.0, -1.0, 1.0, 1.0)]
    torch.testing.assert_close(group, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25, -1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(rewards, 4, scale="none"), centred, atol=1e-12, rtol=0)
    batch = group_advantages(rewards, 4, scale="batch_std", eps=0.0)
    torch.testing.assert_close(batch, centred / rewards.std(), atol=1e-12, rtol=0)


def test_group_advantages_bad_arguments_are_one_line_errors():
    cases = [
        ((torch.zeros(10), 4), {}, "10 rewards do not split into groups of 4: pass whole groups of completions"),
        ((torch.zeros(4), 0), {}, "4 rewards do not split into groups of 0: pass whole groups of completions"),
        ((torch.zeros(4, 1), 4), {}, "rewards must be a (N,) vector, got shape (4, 1)"),
        (
            (torch.zeros(4), 4),
            {"scale": "group"},
            "unknown advantage scale 'group': choose one of group_std, batch_std, none",
        ),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError) as error:
            group_advantages(*args, **kwargs)
        assert str(error.value) == message


T = torch.zeros(2, 3)
A = torch.zeros(2)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (
            (T, T, A, T),
            {"loss_agg": "seq_mean"},
            "unknown GRPO loss_agg 'seq_mean': choose one of token_mean, seq_mean_token_mean, seq_mean_token_sum_norm",
        ),
        (
            (T, T, A, T),
            {"beta": 0.04},
            "beta=0.04 needs ref_logps (the frozen reference's token log-probs); or set beta=0",
        ),
        ((T, T, A, T), {"beta": -1.0}, "GRPO beta must be >= 0, got -1.0"),
        (
            (T, T, A, T),
            {"loss_agg": "seq_mean_token_sum_norm"},
            "loss_agg 'seq_mean_token_sum_norm' needs max_completion_length >= 1 (its constant normaliser), got None",
        ),
        (
            (T, T, A, T),
            {"clip_low": 1.0},
            "clip_low must lie in [0, 1) and clip_high be >= 0, got 1.0 and 0.2",
        ),
        ((T, torch.zeros(2, 4), A, T), {}, "old_logps has shape (2, 4), expected (2, 3) like logps"),
        ((T, T, A, T), {"ref_logps": torch.zeros(3, 3)}, "ref_logps has shape (3, 3), expected (2, 3) like logps"),
        ((T, T, torch.zeros(2, 1), T), {}, "advantages must be (2,), one per completion, got (2, 1)"),
        ((A, A, A, A), {}, "logps must be (batch, completion_tokens), got shape (2,)"),
        ((T, T, A, T), {"kl_clamp": 0.0}, "kl_clamp must be > 0 (or None for no clamp), got 0.0"),
        (
            (T, T, A, T),
            {"entropy_coeff": 0.001},
            "entropy_coeff=0.001 must be >= 0, and > 0 needs the policy's token entropy",
        ),
        ((T, T, A, T), {"entropy": torch.zeros(2, 4)}, "entropy has shape (2, 4), expected (2, 3) like logps"),
    ],
)
def test_grpo_loss_bad_arguments_are_one_line_errors(args, kwargs, message):
    with pytest.raises(ValueError) as error:
        grpo_loss(*args, **kwargs)
    assert str(error.value) == message
