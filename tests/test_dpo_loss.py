"""dpo_loss against TRL 1.16's DPOTrainer and against the formulas written out longhand.

TRL has no standalone DPO loss function: the math sits inside `DPOTrainer._compute_loss`, after the model
forward. `TrlLoss` runs that method unchanged, with `self` a stand-in holding the attributes it reads and a
stub model whose per-token log-probs are our per-sequence sums (in the first position, zeros elsewhere).
TRL then sums them back over the sequence, so its loss sees exactly our tensors and its gradient reaches
them through the stub. Reference log-probs go in as TRL's precomputed `ref_*_logps` columns.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from moxin_lightning.losses import dpo_loss

BETAS = [0.1, 5.0]
SEEDS = [0, 1, 2]


def preference_batch(seed, batch=6, dtype=torch.float32):
    """Per-sequence sums of token log-probs for a batch of pairs, with response lengths 1..40."""
    g = torch.Generator().manual_seed(seed)
    chosen_lengths = torch.randint(1, 41, (batch,), generator=g)
    rejected_lengths = torch.randint(1, 41, (batch,), generator=g)
    ref_chosen = -chosen_lengths * (0.5 + 2 * torch.rand(batch, generator=g))
    ref_rejected = -rejected_lengths * (0.5 + 2 * torch.rand(batch, generator=g))
    policy_chosen = ref_chosen + torch.randn(batch, generator=g) * 3
    policy_rejected = ref_rejected + torch.randn(batch, generator=g) * 3
    tensors = [t.to(dtype) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)]
    return (*tensors, chosen_lengths, rejected_lengths)


class TrlLoss:
    """Calls TRL 1.16's `DPOTrainer._compute_loss` on chosen per-sequence log-probs."""

    def __init__(self, loss_type, beta, label_smoothing=0.0):
        trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
        self.compute_loss = trl_dpo.DPOTrainer._compute_loss
        self.trainer = SimpleNamespace(
            model=SimpleNamespace(training=True),
            accelerator=SimpleNamespace(device=torch.device("cpu"), gather=_same, gather_for_metrics=_same),
            args=SimpleNamespace(gradient_checkpointing_kwargs=None),
            aux_loss_enabled=False,
            precompute_ref_logps=True,
            ld_alpha=None,
            f_divergence_type="reverse_kl",
            loss_types=[loss_type],
            loss_weights=[1.0],
            beta=beta,
            label_smoothing=label_smoothing,
            use_weighting=False,
            _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
            _total_train_tokens=0,
            _tp_size=1,
        )

    def __call__(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths):
        """TRL's batch-mean loss and its logged metrics; gradients flow into the policy log-probs."""
        lengths = torch.cat([chosen_lengths, rejected_lengths])
        seq_len = int(lengths.max()) + 2  # TRL shifts by one; completions sit at the end, after a prompt token
        completion_mask = (torch.arange(seq_len) >= seq_len - lengths.unsqueeze(1)).long()
        policy_logps = torch.cat([policy_chosen, policy_rejected])  # TRL's batch is [chosen; rejected]
        per_token = torch.cat([policy_logps.unsqueeze(1), policy_logps.new_zeros(len(lengths), seq_len - 2)], dim=1)
        inputs = {
            "input_ids": torch.ones(len(lengths), seq_len, dtype=torch.long),
            "attention_mask": torch.ones(len(lengths), seq_len, dtype=torch.long),
            "completion_mask": completion_mask,
            "ref_chosen_logps": ref_chosen,
            "ref_rejected_logps": ref_rejected,
        }

        def stub_model(**_):
            zeros = torch.zeros(len(lengths), seq_len - 1)
            return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

        loss = self.compute_loss(self.trainer, stub_model, inputs, return_outputs=False)
        metrics = {name: values[-1] for name, values in self.trainer._metrics["train"].items()}
        return loss, metrics


def _same(tensor):
    return tensor


def ours_and_trls(seed, beta, our_type, trl_type):
    """(our per-pair losses, rewards, policy grads of the mean) and (TRL's loss, metrics, policy grads)."""
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths = preference_batch(seed)
    policy_chosen.requires_grad_()
    policy_rejected.requires_grad_()
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        beta=beta,
        loss_type=our_type,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    our_grads = torch.autograd.grad(losses.mean(), [policy_chosen, policy_rejected])
    trl_loss, metrics = TrlLoss(trl_type, beta)(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths
    )
    trl_grads = torch.autograd.grad(trl_loss, [policy_chosen, policy_rejected])
    return (losses, chosen_rewards, rejected_rewards, our_grads), (trl_loss, metrics, trl_grads)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize(
    ("our_type", "trl_type"), [("sigmoid", "sigmoid"), ("ipo", "ipo"), ("dpo_norm", "sigmoid_norm")]
)
def test_loss_and_gradients_equal_trl(our_type, trl_type, beta, seed):
    (losses, chosen_rewards, rejected_rewards, our_grads), (trl_loss, metrics, trl_grads) = ours_and_trls(
        seed, beta, our_type, trl_type
    )
    assert losses.shape == (6,)
    torch.testing.assert_close(losses.mean(), trl_loss, atol=1e-6, rtol=0)
    for ours, trls in zip(our_grads, trl_grads, strict=True):
        assert trls.abs().max() > 0
        torch.testing.assert_close(ours, trls, atol=1e-6, rtol=0)
    margin = (chosen_rewards - rejected_rewards).mean().item()
    accuracy = (chosen_rewards > rejected_rewards).float().mean().item()
    if our_type != "dpo_norm":  # TRL logs un-normalised rewards even for sigmoid_norm; ours follow open-instruct
        assert chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
        assert rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], abs=1e-5)
        assert margin == pytest.approx(metrics["rewards/margins"], abs=1e-5)
        assert accuracy == metrics["rewards/accuracies"]


@pytest.mark.parametrize("our_type", ["sigmoid", "ipo", "dpo_norm"])
def test_each_pair_loss_equals_trl_on_that_pair_alone(our_type):
    trl_type = {"dpo_norm": "sigmoid_norm"}.get(our_type, our_type)
    batch = preference_batch(seed=7)
    losses, _, _ = dpo_loss(
        *batch[:4], beta=5.0, loss_type=our_type, chosen_lengths=batch[4], rejected_lengths=batch[5]
    )
    trl = TrlLoss(trl_type, beta=5.0)
    for i in range(len(losses)):
        trl_loss, _ = trl(*(t[i : i + 1] for t in batch))
        torch.testing.assert_close(losses[i], trl_loss, atol=1e-6, rtol=0)


@pytest.mark.parametrize("beta", BETAS)
def test_label_smoothing_equals_the_cdpo_form_in_trl(beta):
    """TRL 1.16's `sigmoid` ignores label_smoothing; its `aot` loss has the cDPO form and, on one pair
    (nothing to sort), computes exactly -(1-eps) logsigmoid(beta m) - eps logsigmoid(-beta m)."""
    batch = [t.double() if t.is_floating_point() else t for t in preference_batch(seed=3)]
    policy_chosen, policy_rejected = (t.requires_grad_() for t in batch[:2])
    losses, _, _ = dpo_loss(*batch[:4], beta=beta, label_smoothing=0.2)
    trl = TrlLoss("aot", beta=beta, label_smoothing=0.2)
    for i in range(len(losses)):
        ours_grads = torch.autograd.grad(losses[i], [policy_chosen, policy_rejected], retain_graph=True)
        trl_loss, _ = trl(*(t[i : i + 1] for t in batch))
        trl_grads = torch.autograd.grad(trl_loss, [policy_chosen, policy_rejected])
        torch.testing.assert_close(losses[i], trl_loss, atol=1e-9, rtol=0)
        for ours, trls in zip(ours_grads, trl_grads, strict=True):
            torch.testing.assert_close(ours, trls, atol=1e-9, rtol=0)


def longhand(loss_type, beta, label_smoothing, pc, pr, rc, rr, lc, lr):
    """The papers' and open-instruct's formulas, in float64, written independently of dpo_loss."""
    if loss_type == "dpo_norm":  # open-instruct: average_log_prob=True for policy AND reference, then DPO
        pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
    if loss_type == "ipo":
        h = (pc - rc) / lc - (pr - rr) / lr
        return (h - 1 / (2 * beta)) ** 2, beta * (pc - rc), beta * (pr - rr)
    logits = (pc - pr) - (rc - rr)
    eps = label_smoothing
    losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    return losses, beta * (pc - rc), beta * (pr - rr)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"),
    [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("dpo_norm", 0.0), ("dpo_norm", 0.3)],
)
def test_matches_the_formulas_written_out_longhand(loss_type, label_smoothing, beta, seed):
    batch = preference_batch(seed, dtype=torch.float64)
    pc, pr = (t.clone().requires_grad_() for t in batch[:2])
    ours = dpo_loss(
        pc,
        pr,
        *batch[2:4],
        beta=beta,
        loss_type=loss_type,
        chosen_lengths=batch[4],
        rejected_lengths=batch[5],
        label_smoothing=label_smoothing,
    )
    lpc, lpr = (t.clone().requires_grad_() for t in batch[:2])
    expected = longhand(loss_type, beta, label_smoothing, lpc, lpr, *batch[2:4], batch[4].double(), batch[5].double())
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want.detach(), atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad(ours[0].sum(), [pc, pr])
    expected_grads = torch.autograd.grad(expected[0].sum(), [lpc, lpr])
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_known_values():
    one = torch.tensor([-10.0])
    # policy = reference: margin 0, DPO loss log 2, IPO loss (1/(2 beta))^2, rewards 0
    losses, chosen_rewards, rejected_rewards = dpo_loss(one, one, one, one, beta=0.1)
    assert losses.item() == pytest.approx(math.log(2)) and chosen_rewards.item() == rejected_rewards.item() == 0
    ipo, _, _ = dpo_loss(one, one, one, one, beta=0.1, loss_type="ipo", chosen_lengths=one, rejected_lengths=one)
    assert ipo.item() == pytest.approx(25.0)
    # chosen gained 8 nats over 4 tokens, rejected lost 2 over 2: dpo_norm margin (2 - -1) = 3 per token
    args = (torch.tensor([-2.0]), torch.tensor([-12.0]), torch.tensor([-10.0]), torch.tensor([-10.0]))
    lengths = {"chosen_lengths": torch.tensor([4]), "rejected_lengths": torch.tensor([2])}
    losses, chosen_rewards, rejected_rewards = dpo_loss(*args, beta=5.0, loss_type="dpo_norm", **lengths)
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-15.0))))
    assert (chosen_rewards.item(), rejected_rewards.item()) == (10.0, -5.0)
    losses, chosen_rewards, rejected_rewards = dpo_loss(*args, beta=5.0, loss_type="sigmoid")
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-50.0))), abs=1e-12)
    assert (chosen_rewards.item(), rejected_rewards.item()) == (40.0, -10.0)


def test_rewards_are_detached_and_losses_are_differentiable():
    batch = preference_batch(seed=4)
    policy_chosen = batch[0].requires_grad_()
    for loss_type in ("sigmoid", "ipo", "dpo_norm"):
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen,
            *batch[1:4],
            beta=1.0,
            loss_type=loss_type,
            chosen_lengths=batch[4],
            rejected_lengths=batch[5],
        )
        assert losses.requires_grad and not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


B = torch.zeros(3)
NEEDS_LENGTHS = "needs chosen_lengths and rejected_lengths (response token counts)"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "simpo"}, "unknown DPO loss_type 'simpo': choose one of sigmoid, ipo, dpo_norm"),
        ({"loss_type": "dpo_norm"}, f"loss_type 'dpo_norm' {NEEDS_LENGTHS}"),
        ({"loss_type": "ipo", "chosen_lengths": B}, f"loss_type 'ipo' {NEEDS_LENGTHS}"),
        (
            {"loss_type": "dpo_norm", "chosen_lengths": B, "rejected_lengths": torch.ones(2)},
            "rejected_lengths has shape (2,), expected (3,)",
        ),
        ({"beta": 0.0}, "DPO beta must be > 0, got 0.0"),
        ({"label_smoothing": 0.5}, "label_smoothing must lie in [0, 0.5), got 0.5"),
        (
            {"loss_type": "ipo", "label_smoothing": 0.1},
            "label_smoothing has no meaning for loss_type 'ipo': set label_smoothing=0",
        ),
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError) as error:
        dpo_loss(B, B, B, B, **{"beta": 0.1, **kwargs})
    assert str(error.value) == message


def test_mismatched_log_prob_shapes_are_one_line_errors():
    with pytest.raises(ValueError) as error:
        dpo_loss(B, B, torch.zeros(2), B, beta=0.1)
    assert str(error.value) == "DPO log-probs must all be (batch,) per-sequence sums, got shapes (3,), (3,), (2,), (3,)"
    with pytest.raises(ValueError, match=r"got shapes \(3, 1\), "):
        dpo_loss(*(torch.zeros(3, 1),) * 4, beta=0.1)
