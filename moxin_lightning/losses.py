"""Losses as pure functions of tensors. Tasks call these; they never inline the math.

`linear_cross_entropy` fuses the output head with next-token cross-entropy: it never keeps the
(tokens x vocab) logits. Chunk by chunk it computes the logits, the loss and, while the chunk is
still in cache, the gradient (softmax minus one-hot), then folds that into the gradients of the hidden
states and of the head weight. The usual path writes the logits, a log-softmax copy, its gradient and a
zero-filled NLL gradient, each tokens x vocab floats: with Moxin's 32K vocabulary that memory traffic
is a large share of a training step.
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over tokens of cross-entropy(hidden @ weight.T, targets), and the number of counted tokens.

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
    loss_sum = _LinearCrossEntropy.apply(hidden, weight, targets, counted, chunk_tokens)
    return loss_sum, counted.sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients; backward only scales them by the incoming gradient.

    That is exact because the output is a scalar sum: d(g * sum_i loss_i) = g * d(sum_i loss_i).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, counted, chunk_tokens):
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        safe_targets = torch.where(counted, targets, 0).unsqueeze(1)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = start + chunk_tokens
            h, target, keep = hidden[start:end], safe_targets[start:end], counted[start:end].unsqueeze(1)
            logits = (h @ weight.t()).float()
            target_logits = logits.gather(1, target)
            row_max = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(row_max).exp_()  # in place: the chunk's only vocab-sized buffer
            row_sum = exp.sum(dim=1, keepdim=True)
            loss_sum += ((row_max + row_sum.log() - target_logits) * keep).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            grad_logits = exp.div_(row_sum)  # softmax
            grad_logits.scatter_add_(1, target, -keep.to(grad_logits.dtype))  # minus one-hot of counted targets
            ignored = (~keep).nonzero()[:, 0]
            if ignored.numel():
                grad_logits.index_fill_(0, ignored, 0.0)
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
