"""Losses as pure functions of tensors. Tasks call these; they never inline the math.

`linear_cross_entropy` fuses the output head with next-token cross-entropy: it never keeps the
(tokens x vocab) logits. Chunk by chunk it computes the logits, the loss and, while the chunk is
still in cache, the gradient (softmax minus one-hot), then folds that into the gradients of the hidden
states and of the head weight. The usual path writes the logits, a log-softmax copy, its gradient and a
zero-filled NLL gradient, each tokens x vocab floats: with Moxin's 32K vocabulary that memory traffic
is a large share of a training step.

`token_logprobs` gives each target's log-probability (DPO, GRPO) without keeping the logits for backward, and
`dpo_loss` holds the DPO-family objectives (equal to TRL's on the same log-probs; see tests/test_dpo_loss.py);
`group_advantages` and `grpo_loss` hold GRPO's advantages and clipped surrogate (equal to TRL's GRPOTrainer; see
tests/test_grpo_loss.py).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int = 1024,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over tokens of cross-entropy(hidden @ weight.T, targets), and the number of counted tokens.

    `weights` (same shape as targets), when given, scales each token's loss: e.g. 1 / (tokens of its sequence),
    which turns the sum into a sum of per-sequence means (SFT's `mean` reduction).
    hidden (..., dim), weight (vocab, dim), targets (...) with `ignore_index` where no loss is taken.
    Returns (loss_sum, n_tokens). Callers divide by the token count of the whole optimizer step
    (all micro-batches and ranks), which is what makes the loss invariant to how a batch is split.
    Logits, softmax and their gradient are computed in fp32 whatever the input dtype.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden states but {targets.shape[0]} targets")
    counted = targets != ignore_index
    scale = counted.to(torch.float32) if weights is None else counted * weights.reshape(-1).to(torch.float32)
    loss_sum = _LinearCrossEntropy.apply(hidden, weight, targets, scale, chunk_tokens)
    return loss_sum, counted.sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients; backward only scales them by the incoming gradient.

    That is exact because the output is a scalar sum: d(g * sum_i loss_i) = g * d(sum_i loss_i).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, chunk_tokens):
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        safe_targets = torch.where(scale != 0, targets, 0).unsqueeze(1)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = start + chunk_tokens
            h, target, keep = hidden[start:end], safe_targets[start:end], scale[start:end].unsqueeze(1)
            logits = (h @ weight.t()).float()
            target_logits = logits.gather(1, target)
            row_max = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(row_max).exp_()  # in place: the chunk's only vocab-sized buffer
            row_sum = exp.sum(dim=1, keepdim=True)
            loss_sum += ((row_max + row_sum.log() - target_logits) * keep).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            grad_logits = exp.div_(row_sum)  # softmax
            grad_logits.scatter_add_(1, target, -torch.ones_like(keep))  # minus one-hot of the targets
            grad_logits.mul_(keep)  # each token's weight (0 where no loss is taken)
            grad_logits = grad_logits.to(h.dtype)
            if grad_hidden is not None:
                torch.mm(grad_logits, weight.to(h.dtype), out=grad_hidden[start:end])
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t().float(), h.float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


DPO_LOSS_TYPES = ("sigmoid", "ipo", "dpo_norm")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards of the chosen and rejected responses.

    Inputs are (B,) per-sequence SUMS of response-token log-probs under the policy and the frozen
    reference; `chosen_lengths` / `rejected_lengths` are (B,) response token counts (labels != -100).
    With the log-ratios  c = policy_chosen - ref_chosen,  r = policy_rejected - ref_rejected,
    the per-token log-ratios  c' = c / chosen_len,  r' = r / rejected_len  (lengths clamped to >= 1,
    as TRL does) and  s(x) = -(1 - eps) * logsigmoid(x) - eps * logsigmoid(-x)  (cDPO label smoothing,
    eps = label_smoothing; eps = 0 is plain DPO):

        sigmoid   (DPO)                     loss = s(beta * (c - r))
        ipo       (IPO as TRL 1.16 has it)  loss = (c' - r' - 1 / (2 * beta)) ** 2
        dpo_norm  (Tulu 3 / open-instruct)  loss = s(beta * (c' - r'))

    Rewards are beta * c and beta * r, except for dpo_norm where open-instruct defines them on the
    length-averaged log-probs: beta * c' and beta * r'. They are detached: metrics, not objectives.

    WHY the details: the log-ratios are formed before their difference, in TRL's order, so the losses
    and gradients match TRL's `DPOTrainer` to the last bit in float32 (tests/test_dpo_loss.py).
    TRL's `sigmoid_norm` is our `dpo_norm` (same loss; TRL's logged rewards are un-normalised).
    IPO's squared loss would grow with response length on summed log-probs; TRL (with the IPO authors)
    averages per token, and so do we. TRL 1.16 ignores label smoothing for `sigmoid`; we keep the
    cDPO form that open-instruct and earlier TRL use, since Tulu 3's recipe exposes it.
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); callers reduce the losses.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}: choose one of {', '.join(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type == "ipo":
        raise ValueError("label_smoothing has no meaning for loss_type 'ipo': set label_smoothing=0")
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if len({tuple(t.shape) for t in logps}) != 1 or policy_chosen_logps.dim() != 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in logps)
        raise ValueError(f"DPO log-probs must all be (batch,) per-sequence sums, got shapes {shapes}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
        losses = _smoothed_logistic_loss(beta * (chosen_logratios - rejected_logratios), label_smoothing)
        return losses, chosen_rewards.detach(), rejected_rewards.detach()
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError(f"loss_type {loss_type!r} needs chosen_lengths and rejected_lengths (response token counts)")
    for name, lengths in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if tuple(lengths.shape) != tuple(policy_chosen_logps.shape):
            raise ValueError(f"{name} has shape {tuple(lengths.shape)}, expected {tuple(policy_chosen_logps.shape)}")
    chosen_per_token = chosen_logratios / chosen_lengths.clamp(min=1).to(chosen_logratios.dtype)
    rejected_per_token = rejected_logratios / rejected_lengths.clamp(min=1).to(rejected_logratios.dtype)
    if loss_type == "ipo":
        losses = (chosen_per_token - rejected_per_token - 1 / (2 * beta)) ** 2
        return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()
    losses = _smoothed_logistic_loss(beta * (chosen_per_token - rejected_per_token), label_smoothing)
    return losses, (beta * chosen_per_token).detach(), (beta * rejected_per_token).detach()


def _smoothed_logistic_loss(scaled_margin: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log p(chosen wins) if the preference label is flipped with probability `label_smoothing` (cDPO)."""
    logsigmoid = torch.nn.functional.logsigmoid
    return -(1 - label_smoothing) * logsigmoid(scaled_margin) - label_smoothing * logsigmoid(-scaled_margin)


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int = 1024,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(target) under softmax(hidden @ weight.T) at every position; 0.0 where target == ignore_index.

    hidden (..., dim), weight (vocab, dim), targets (...) -> float32 tensor shaped like targets.
    DPO needs per-sequence sums of these for the policy (with gradients) and the reference.
    The head runs chunk by chunk in fp32 and only the inputs plus two floats per token are kept for
    backward, which recomputes each chunk's logits: the (tokens x vocab) logits never live across
    forward and backward, where with a 32K vocabulary they would dwarf the model's activations.
    with_entropy: also return each position's entropy of the whole next-token distribution (0.0 where the target
    is ignored), differentiable, from the same logits: GRPO's entropy bonus (veRL's `entropy_coeff`).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match head weight {tuple(weight.shape)}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    if flat_hidden.shape[0] != flat_targets.shape[0]:
        raise ValueError(f"{flat_hidden.shape[0]} hidden states but {flat_targets.shape[0]} targets")
    counted = flat_targets != ignore_index
    logps, entropy = _TokenLogprobs.apply(flat_hidden, weight, flat_targets, counted, chunk_tokens, with_entropy)
    if with_entropy:
        return logps.view(targets.shape), entropy.view(targets.shape)
    return logps.view(targets.shape)


class _TokenLogprobs(torch.autograd.Function):
    """Chunked head + log-softmax gather (and entropy) whose backward recomputes each chunk's logits.

    With z the logits, p = softmax(z) and H = logsumexp(z) - sum(p * z):
    d log p(t) / dz = one_hot(t) - p  and  dH / dz = -p * (z - sum(p * z)). Forward keeps each row's log-sum-exp
    (and, for the entropy, the mean logit sum(p * z)) so backward rebuilds p with one matmul and one exp per chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, counted, chunk_tokens, with_entropy):
        safe_targets = torch.where(counted, targets, 0).unsqueeze(1)
        logps = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        log_normalizers = torch.zeros_like(logps)
        mean_logits = torch.zeros_like(logps) if with_entropy else logps.new_zeros(0)
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = start + chunk_tokens
            logits = (hidden[start:end] @ weight.t()).float()
            log_normalizers[start:end] = logits.logsumexp(dim=1)
            target_logps = logits.gather(1, safe_targets[start:end]).squeeze(1) - log_normalizers[start:end]
            logps[start:end] = torch.where(counted[start:end], target_logps, 0.0)
            if with_entropy:
                probs = (logits - log_normalizers[start:end].unsqueeze(1)).exp_()
                mean_logits[start:end] = (probs * logits).sum(dim=1)
        entropy = torch.where(counted, log_normalizers - mean_logits, 0.0) if with_entropy else mean_logits
        ctx.save_for_backward(hidden, weight, safe_targets, counted, log_normalizers, mean_logits)
        ctx.chunk_tokens, ctx.with_entropy = chunk_tokens, with_entropy
        ctx.mark_non_differentiable(*(() if with_entropy else (entropy,)))
        return logps, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, grad_entropy):
        hidden, weight, safe_targets, counted, log_normalizers, mean_logits = ctx.saved_tensors
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        if grad_hidden is None and grad_weight is None:
            return None, None, None, None, None, None
        grad_logps = torch.where(counted, grad_logps.float(), 0.0).unsqueeze(1)
        if ctx.with_entropy:
            grad_entropy = torch.where(counted, grad_entropy.float(), 0.0).unsqueeze(1)
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            end = start + ctx.chunk_tokens
            h, g = hidden[start:end], grad_logps[start:end]
            logits = (h @ weight.t()).float()
            if ctx.with_entropy:  # -p * (g + g_H * (z - sum(p z)))
                g_h = grad_entropy[start:end]
                probs = (logits - log_normalizers[start:end].unsqueeze(1)).exp_()
                weight_of_p = logits.sub_(mean_logits[start:end].unsqueeze(1)).mul_(g_h).add_(g)
                grad_logits = probs.mul_(weight_of_p).neg_()
            else:
                grad_logits = logits.sub_(log_normalizers[start:end].unsqueeze(1)).exp_().mul_(-g)  # -g * softmax
            grad_logits.scatter_add_(1, safe_targets[start:end], g)  # + g * one_hot(target)
            grad_logits = grad_logits.to(h.dtype)
            if grad_hidden is not None:
                torch.mm(grad_logits, weight.to(h.dtype), out=grad_hidden[start:end])
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t().float(), h.float())
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


ADVANTAGE_SCALES = ("group_std", "batch_std", "none")


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str = "group_std", eps: float = 1e-4
) -> torch.Tensor:
    """GRPO's group-relative advantages: each reward minus the mean of its group, optionally over a std.

    rewards (N,) hold consecutive groups of `group_size` completions of the same prompt. The group mean is
    the baseline (GRPO needs no value model). `scale` divides by the group's std (`group_std`, DeepSeekMath),
    the whole batch's std (`batch_std`, "Tricks or Traps" / TRL's "batch") or nothing (`none`, Dr. GRPO:
    dividing by a per-group std up-weights prompts that are nearly always solved or failed).
    Stds are unbiased (Bessel) and `eps` is added to the std, not the variance, exactly as TRL 1.16's
    GRPOTrainer does, so a group whose rewards are all equal gets advantage 0, never a division by zero.
    A single completion has no spread: its std counts as 0.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}: choose one of {', '.join(ADVANTAGE_SCALES)}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a (N,) vector, got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of {group_size}: pass whole groups of completions"
        )
    rewards = rewards if rewards.is_floating_point() else rewards.float()  # 0/1 correctness rewards may be ints
    groups = rewards.view(-1, group_size)
    advantages = (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return advantages
    if scale == "group_std":
        spread = rewards.new_zeros(()) if group_size == 1 else groups.std(dim=1, keepdim=True).expand_as(groups)
    else:
        spread = rewards.new_zeros(()) if rewards.numel() == 1 else rewards.std()
    return advantages / (spread.reshape(-1) + eps)


GRPO_LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    loss_agg: str = "token_mean",
    max_completion_length: int | None = None,
    kl_clamp: float | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coeff: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO surrogate with an optional k3 KL penalty and entropy bonus, as (loss_sum, count, stats).

    logps, old_logps, ref_logps, mask, entropy: (B, T) per completion token (policy now, policy that sampled,
    frozen reference; mask 1 where a token is scored; the policy's entropy there); advantages (B,), one per
    completion. Per token, with ratio = exp(logps - old_logps) and A the completion's advantage:

        loss = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) + beta * kl - entropy_coeff * entropy
        kl   = exp(ref - logps) - (ref - logps) - 1          (k3: unbiased, always >= 0)

    `kl_clamp` bounds kl to [-kl_clamp, kl_clamp] (veRL's `low_var_kl` clamps at 10, as DeepScaleR ran it): a
    token whose policy has drifted far from the reference then stops pulling on the gradient through the KL term.
    The entropy bonus (veRL's `entropy_coeff`, 0.001 in DeepScaleR's runs) is aggregated like the rest of the
    token loss, which is veRL's token mean under `token_mean`.

    WHY a (sum, count) pair: the task base divides the gradient of the summed loss_sum by the count summed
    over the whole optimizer step (micro-batches and ranks), so the result does not depend on how rollouts
    are split. Each `loss_agg` picks the pair whose global ratio is its published objective:

        token_mean               (DAPO)        sum of token losses              / number of tokens
        seq_mean_token_mean      (GRPO)        sum of each sequence's token mean / number of sequences
        seq_mean_token_sum_norm  (Dr. GRPO)    sum of token losses / max_completion_length / number of sequences

    On one micro-batch these equal TRL 1.16's "dapo" (and "bnpo"), "grpo" and "dr_grpo" losses, values and
    gradients (tests/test_grpo_loss.py). Every row counts as a sequence, even one with no scored token, as in TRL.
    stats (detached means over scored tokens): ratio_mean, clip_fraction_low (ratio below 1 - clip_low with
    A < 0: the clipped term is the active one), clip_fraction_high (above 1 + clip_high with A > 0),
    clip_fraction (either), kl (when beta > 0), entropy (when given), and tokens (their number, to weight means
    across micro-batches).
    """
    if loss_agg not in GRPO_LOSS_AGGREGATIONS:
        raise ValueError(f"unknown GRPO loss_agg {loss_agg!r}: choose one of {', '.join(GRPO_LOSS_AGGREGATIONS)}")
    if logps.dim() != 2:
        raise ValueError(f"logps must be (batch, completion_tokens), got shape {tuple(logps.shape)}")
    for name, tensor in (("old_logps", old_logps), ("mask", mask), ("ref_logps", ref_logps), ("entropy", entropy)):
        if tensor is not None and tensor.shape != logps.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(logps.shape)} like logps")
    if tuple(advantages.shape) != (logps.shape[0],):
        raise ValueError(f"advantages must be ({logps.shape[0]},), one per completion, got {tuple(advantages.shape)}")
    if beta < 0:
        raise ValueError(f"GRPO beta must be >= 0, got {beta}")
    if beta > 0 and ref_logps is None:
        raise ValueError(f"beta={beta} needs ref_logps (the frozen reference's token log-probs); or set beta=0")
    if kl_clamp is not None and not kl_clamp > 0:
        raise ValueError(f"kl_clamp must be > 0 (or None for no clamp), got {kl_clamp}")
    if entropy_coeff < 0 or (entropy_coeff > 0 and entropy is None):
        raise ValueError(f"entropy_coeff={entropy_coeff} must be >= 0, and > 0 needs the policy's token entropy")
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"clip_low must lie in [0, 1) and clip_high be >= 0, got {clip_low} and {clip_high}")
    if loss_agg == "seq_mean_token_sum_norm" and (max_completion_length is None or max_completion_length < 1):
        raise ValueError(
            f"loss_agg 'seq_mean_token_sum_norm' needs max_completion_length >= 1 (its constant normaliser), "
            f"got {max_completion_length}"
        )
    scored = mask != 0
    mask = mask.to(logps.dtype)
    advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = -torch.min(ratio * advantages, clipped_ratio * advantages)
    if beta > 0:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if kl_clamp is not None:
            kl = kl.clamp(-kl_clamp, kl_clamp)
        per_token = per_token + beta * kl
    if entropy_coeff > 0:
        per_token = per_token - entropy_coeff * entropy
    masked = per_token * mask
    n_sequences = torch.tensor(logps.shape[0], device=logps.device)
    if loss_agg == "token_mean":
        loss_sum, count = masked.sum(), scored.sum()
    elif loss_agg == "seq_mean_token_mean":
        loss_sum, count = (masked.sum(-1) / scored.sum(-1).clamp(min=1)).sum(), n_sequences
    else:
        loss_sum, count = masked.sum() / max_completion_length, n_sequences

    with torch.no_grad():
        tokens = scored.sum()
        stats_dtype = torch.promote_types(logps.dtype, torch.float32)

        def token_mean(values: torch.Tensor) -> torch.Tensor:
            return values.to(stats_dtype)[scored].sum() / tokens.clamp(min=1)

        low = (ratio < 1 - clip_low) & (advantages < 0)
        high = (ratio > 1 + clip_high) & (advantages > 0)
        stats = {
            "ratio_mean": token_mean(ratio),
            "clip_fraction_low": token_mean(low),
            "clip_fraction_high": token_mean(high),
            "clip_fraction": token_mean(low | high),
            "tokens": tokens,
        }
        if beta > 0:
            stats["kl"] = token_mean(kl)
        if entropy is not None:
            stats["entropy"] = token_mean(entropy)
    return loss_sum, count, stats
