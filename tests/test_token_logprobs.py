import pytest
import torch

from moxin_lightning.losses import IGNORE_INDEX, linear_cross_entropy, token_logprobs


def problem(shape=(4, 75), dim=24, vocab=97, seed=0, dtype=torch.float32, ignored_fraction=0.2):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, dim, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) * 0.3).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, shape, generator=g)
    targets[torch.rand(shape, generator=g) < ignored_fraction] = IGNORE_INDEX
    upstream = torch.randn(shape, generator=g)  # a non-uniform incoming gradient, as per-sequence sums give
    return hidden, weight, targets, upstream


def naive_logprobs(hidden, weight, targets, ignore_index=IGNORE_INDEX):
    """The textbook version: full logits, log-softmax, gather."""
    logps = torch.log_softmax(hidden.float() @ weight.float().t(), dim=-1)
    counted = targets != ignore_index
    gathered = logps.gather(-1, torch.where(counted, targets, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(counted, gathered, 0.0)


def gradients(fn, hidden, weight, targets, upstream):
    hidden.grad, weight.grad = None, None
    logps = fn(hidden, weight, targets)
    (logps * upstream).sum().backward()
    return logps.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1024])
def test_values_and_gradients_equal_the_naive_log_softmax_gather(chunk):
    hidden, weight, targets, upstream = problem()
    ref_logps, ref_hidden_grad, ref_weight_grad = gradients(naive_logprobs, hidden, weight, targets, upstream)
    logps, hidden_grad, weight_grad = gradients(
        lambda h, w, t: token_logprobs(h, w, t, chunk_tokens=chunk), hidden, weight, targets, upstream
    )
    assert logps.shape == targets.shape and logps.dtype == torch.float32
    torch.testing.assert_close(logps, ref_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden_grad, ref_hidden_grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(weight_grad, ref_weight_grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_entropy_and_its_gradient_equal_the_full_softmax(chunk):
    hidden, weight, targets, upstream = problem(seed=3)
    entropy_upstream = torch.randn(targets.shape, generator=torch.Generator().manual_seed(4))
    counted = targets != IGNORE_INDEX

    def naive(h, w):
        log_p = torch.log_softmax(h.float() @ w.float().t(), dim=-1)
        entropy = torch.where(counted, -(log_p.exp() * log_p).sum(-1), 0.0)
        return naive_logprobs(h, w, targets), entropy

    results = []
    for fn in (naive, lambda h, w: token_logprobs(h, w, targets, chunk_tokens=chunk, with_entropy=True)):
        hidden.grad, weight.grad = None, None
        logps, entropy = fn(hidden, weight)
        ((logps * upstream).sum() + (entropy * entropy_upstream).sum()).backward()
        results.append((logps.detach(), entropy.detach(), hidden.grad.clone(), weight.grad.clone()))
    for ours, reference in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    entropy = results[1][1]
    assert torch.all(entropy[~counted] == 0) and torch.all(entropy[counted] > 0)
    assert float(entropy.max()) <= torch.log(torch.tensor(97.0)).item()  # at most log(vocab)


def test_ignored_positions_are_zero_and_get_no_gradient():
    hidden, weight, targets, upstream = problem(ignored_fraction=0.5, seed=1)
    ignored = targets == IGNORE_INDEX
    logps, hidden_grad, weight_grad = gradients(token_logprobs, hidden, weight, targets, upstream)
    assert ignored.sum() > 50
    assert torch.all(logps[ignored] == 0.0) and torch.all(logps[~ignored] < 0)
    assert torch.count_nonzero(hidden_grad[ignored]) == 0
    assert torch.count_nonzero(hidden_grad[~ignored].abs().sum(-1)) == int((~ignored).sum())
    # the head's gradient comes from the counted positions only
    kept_hidden = hidden.detach()[~ignored].requires_grad_()
    kept_weight = weight.detach().clone().requires_grad_()
    (naive_logprobs(kept_hidden, kept_weight, targets[~ignored]) * upstream[~ignored]).sum().backward()
    torch.testing.assert_close(weight_grad, kept_weight.grad, atol=1e-5, rtol=0)


def test_custom_ignore_index_and_all_ignored():
    hidden, weight, _, _ = problem(shape=(2, 5), seed=2)
    targets = torch.tensor([[3, -1, 5, -1, 0], [-1, -1, -1, -1, 96]])
    logps = token_logprobs(hidden, weight, targets, ignore_index=-1)
    torch.testing.assert_close(logps, naive_logprobs(hidden, weight, targets, ignore_index=-1), atol=1e-6, rtol=0)
    assert torch.all(logps[targets == -1] == 0.0)
    nothing = token_logprobs(hidden, weight, torch.full((2, 5), IGNORE_INDEX))
    nothing.sum().backward()
    assert torch.all(nothing == 0.0)
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_summed_log_probs_are_minus_the_fused_cross_entropy():
    hidden, weight, targets, _ = problem(seed=3)
    loss_sum, _ = linear_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(token_logprobs(hidden, weight, targets).sum(), -loss_sum, atol=1e-4, rtol=1e-6)


def test_only_one_gradient_requested():
    hidden, weight, targets, upstream = problem(seed=4)
    _, ref_hidden_grad, ref_weight_grad = gradients(naive_logprobs, hidden, weight, targets, upstream)
    frozen_weight = weight.detach()
    hidden.grad = None
    (token_logprobs(hidden, frozen_weight, targets) * upstream).sum().backward()
    torch.testing.assert_close(hidden.grad, ref_hidden_grad, atol=1e-5, rtol=0)
    weight.grad = None
    (token_logprobs(hidden.detach(), weight, targets) * upstream).sum().backward()
    torch.testing.assert_close(weight.grad, ref_weight_grad, atol=1e-5, rtol=0)


def test_bf16_inputs_give_fp32_log_probs_and_bf16_gradients_close_to_fp32():
    hidden, weight, targets, upstream = problem(dtype=torch.bfloat16, seed=5)
    logps, hidden_grad, weight_grad = gradients(token_logprobs, hidden, weight, targets, upstream)
    assert logps.dtype == torch.float32
    assert hidden_grad.dtype == torch.bfloat16 and weight_grad.dtype == torch.bfloat16
    ref_hidden = hidden.detach().float().requires_grad_()
    ref_weight = weight.detach().float().requires_grad_()
    ref_logps, ref_hidden_grad, ref_weight_grad = gradients(naive_logprobs, ref_hidden, ref_weight, targets, upstream)
    torch.testing.assert_close(logps, ref_logps, atol=5e-2, rtol=2e-2)  # bf16 matmul: 8-bit mantissa
    torch.testing.assert_close(hidden_grad.float(), ref_hidden_grad, atol=1e-2, rtol=2e-2)
    torch.testing.assert_close(weight_grad.float(), ref_weight_grad, atol=5e-2, rtol=2e-2)


def saved_for_backward_bytes(fn) -> int:
    """Bytes autograd keeps between forward and backward, counting each storage once."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def test_logits_are_not_kept_for_backward():
    tokens, dim, vocab = 512, 32, 16384
    hidden = torch.randn(tokens, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    logits_bytes = tokens * vocab * 4
    naive = saved_for_backward_bytes(lambda: naive_logprobs(hidden, weight, targets))
    chunked = saved_for_backward_bytes(lambda: token_logprobs(hidden, weight, targets, chunk_tokens=64))
    inputs_bytes = hidden.nbytes + weight.nbytes
    assert naive >= logits_bytes
    # the inputs (already alive) plus targets, mask and one log-normaliser per token
    assert chunked == inputs_bytes + tokens * (8 + 1 + 4)
    assert chunked - inputs_bytes < logits_bytes / 1000


@pytest.mark.parametrize(
    ("hidden_shape", "weight_shape", "targets_shape", "chunk", "message"),
    [
        ((2, 5, 8), (11, 8), (2, 4), 16, "10 hidden states but 8 targets"),
        ((2, 5, 8), (11, 6), (2, 5), 16, r"hidden size 8 does not match head weight \(11, 6\)"),
        ((2, 5, 8), (11, 8), (2, 5), 0, "chunk_tokens must be >= 1, got 0"),
    ],
)
def test_bad_shapes_are_one_line_errors(hidden_shape, weight_shape, targets_shape, chunk, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        token_logprobs(
            torch.randn(hidden_shape),
            torch.randn(weight_shape),
            torch.zeros(targets_shape, dtype=torch.long),
            chunk_tokens=chunk,
        )
