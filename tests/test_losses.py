import pytest
import torch
import torch.nn.functional as F

from moxin_lightning.losses import IGNORE_INDEX, linear_cross_entropy


def problem(n=300, dim=24, vocab=97, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) * 0.3).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.2] = IGNORE_INDEX
    return hidden, weight, targets


def reference(hidden, weight, targets, scale):
    loss = F.cross_entropy((hidden.float() @ weight.float().t()), targets, reduction="sum", ignore_index=IGNORE_INDEX)
    (scale * loss).backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1024])
def test_matches_cross_entropy_loss_and_gradients(chunk):
    hidden, weight, targets = problem()
    ref_loss, ref_hidden_grad, ref_weight_grad = reference(hidden, weight, targets, scale=2.5)
    hidden.grad, weight.grad = None, None
    loss_sum, count = linear_cross_entropy(hidden, weight, targets, chunk_tokens=chunk)
    (2.5 * loss_sum).backward()
    assert count.item() == int((targets != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss_sum, ref_loss, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(hidden.grad, ref_hidden_grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad, ref_weight_grad, atol=1e-5, rtol=1e-5)


def test_mean_over_counted_tokens_equals_torch_mean():
    hidden, weight, targets = problem(n=3 * 5 * 7, seed=1)
    loss_sum, count = linear_cross_entropy(hidden.view(3, 35, -1), weight, targets.view(3, 35), chunk_tokens=16)
    expected = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss_sum / count, expected, atol=1e-6, rtol=1e-6)


def test_all_ignored_gives_zero_loss_and_zero_gradients():
    hidden, weight, _ = problem(n=10)
    loss_sum, count = linear_cross_entropy(hidden, weight, torch.full((10,), IGNORE_INDEX))
    loss_sum.backward()
    assert loss_sum.item() == 0.0 and count.item() == 0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_bf16_inputs_track_the_fp32_reference():
    hidden, weight, targets = problem(dtype=torch.bfloat16, seed=2)
    loss_sum, _ = linear_cross_entropy(hidden, weight, targets)
    loss_sum.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    ref_hidden = hidden.detach().float().requires_grad_()
    ref_weight = weight.detach().float().requires_grad_()
    ref_loss, ref_hidden_grad, ref_weight_grad = reference(ref_hidden, ref_weight, targets, scale=1.0)
    assert abs(loss_sum.item() - ref_loss.item()) / ref_loss.item() < 1e-2
    torch.testing.assert_close(hidden.grad.float(), ref_hidden_grad, atol=1e-2, rtol=2e-2)  # bf16: 8-bit mantissa
    torch.testing.assert_close(weight.grad.float(), ref_weight_grad, atol=1e-2, rtol=2e-2)


def test_without_gradients_only_the_loss_is_computed():
    hidden, weight, targets = problem()
    with torch.no_grad():
        loss_sum, _ = linear_cross_entropy(hidden, weight, targets, chunk_tokens=50)
    expected = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum", ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss_sum, expected.detach(), atol=1e-4, rtol=1e-6)


def test_mismatched_targets_are_refused():
    hidden, weight, targets = problem(n=10)
    with pytest.raises(ValueError, match="10 hidden states but 9 targets"):
        linear_cross_entropy(hidden, weight, targets[:9])


@pytest.mark.parametrize("chunk", [7, 1024])
def test_token_weights_scale_each_tokens_loss_and_gradient(chunk):
    hidden, weight, targets = problem(seed=4)
    weights = torch.rand(targets.shape, generator=torch.Generator().manual_seed(1)) + 0.1
    per_token = F.cross_entropy(hidden @ weight.t(), targets, reduction="none", ignore_index=IGNORE_INDEX)
    (weights * per_token).sum().backward()
    expected = (weights * per_token).sum().detach(), hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    loss_sum, count = linear_cross_entropy(hidden, weight, targets, chunk_tokens=chunk, weights=weights)
    loss_sum.backward()
    assert count.item() == int((targets != IGNORE_INDEX).sum())  # the count is of tokens, whatever the weights
    torch.testing.assert_close(loss_sum, expected[0], atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(hidden.grad, expected[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad, expected[2], atol=1e-5, rtol=1e-5)
