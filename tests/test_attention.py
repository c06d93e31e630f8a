import importlib.util

import pytest
import torch

from moxin_lightning.model import AttentionLayout, Transformer, available_kernels, get_kernel, register_kernel
from moxin_lightning.model.attention import banded_causal_mask

from .conftest import tiny_config, tiny_model

W = 8


def reference_attention(q, k, v, visible):
    """Softmax attention written out longhand: repeat KV heads, mask, softmax. visible: (B, Tq, Tk) bool."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
    return scores.softmax(-1) @ v


def loop_mask(length, window, doc_ids=None):
    """The visibility rule, one (query, key) pair at a time: the independent statement of the convention."""
    batch = 1 if doc_ids is None else doc_ids.shape[0]
    visible = torch.zeros(batch, length, length, dtype=torch.bool)
    for b in range(batch):
        for i in range(length):
            for j in range(length):
                same_doc = doc_ids is None or doc_ids[b, i] == doc_ids[b, j]
                visible[b, i, j] = j <= i and i - j < window and same_doc
    return visible


def qkv(batch, length, seed=0, heads=6, kv_heads=2, dim=16):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, heads, length, dim, generator=g),
        torch.randn(batch, kv_heads, length, dim, generator=g),
        torch.randn(batch, kv_heads, length, dim, generator=g),
    )


def random_docs(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    boundaries = torch.rand(batch, length, generator=g) < 0.2
    boundaries[:, 0] = False
    return boundaries.long().cumsum(1)


@pytest.mark.parametrize("length", [W - 1, W, W + 1, 3 * W + 5])
def test_a_query_sees_window_keys_including_itself(length):
    visible = banded_causal_mask(length, W, torch.device("cpu"))
    assert visible.sum(1).tolist() == [min(i + 1, W) for i in range(length)]
    assert torch.equal(visible, loop_mask(length, W)[0])


def test_banded_mask_is_built_once_per_shape():
    cpu = torch.device("cpu")
    assert banded_causal_mask(64, W, cpu) is banded_causal_mask(64, W, cpu)


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
@pytest.mark.parametrize("length", [W - 1, W, W + 1, 3 * W + 5])
@pytest.mark.parametrize("packed", [False, True])
def test_kernels_match_the_longhand_reference(kernel, length, packed):
    q, k, v = qkv(2, length)
    doc_ids = random_docs(2, length) if packed else None
    layout = AttentionLayout.self_attention(length, W, doc_ids)
    with torch.no_grad():
        out = get_kernel(kernel)(q, k, v, layout)
    expected = reference_attention(q, k, v, loop_mask(length, W, doc_ids))
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


def test_sdpa_uses_is_causal_when_the_window_cannot_cut_and_a_mask_otherwise():
    q, k, v = qkv(1, W)
    layout = AttentionLayout.self_attention(W, W)
    get_kernel("sdpa")(q, k, v, layout)
    assert layout.is_plain_causal and "dense" not in layout._memo
    q, k, v = qkv(1, W + 1)
    layout = AttentionLayout.self_attention(W + 1, W)
    get_kernel("sdpa")(q, k, v, layout)
    assert not layout.is_plain_causal and layout._memo["dense"].shape == (W + 1, W + 1)


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_cached_layout_is_order_free(kernel):
    """A rolling buffer stores keys out of order; only their positions decide visibility."""
    q, k, v = qkv(1, 12)
    q = q[:, :, -3:]  # the last three tokens query all twelve keys
    q_index = torch.tensor([[9, 10, 11]])
    k_index = torch.arange(12).unsqueeze(0)
    shuffle = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    chronological = get_kernel(kernel)(q, k, v, AttentionLayout.cached(q_index, k_index, W))
    shuffled = get_kernel(kernel)(
        q, k[:, :, shuffle], v[:, :, shuffle], AttentionLayout.cached(q_index, k_index[:, shuffle], W)
    )
    torch.testing.assert_close(shuffled, chronological, atol=2e-6, rtol=1e-5)
    visible = (k_index.unsqueeze(1) <= q_index.unsqueeze(2)) & (q_index.unsqueeze(2) - k_index.unsqueeze(1) < W)
    torch.testing.assert_close(chronological, reference_attention(q, k, v, visible), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("length", [W - 1, W, W + 1, 4 * W])
def test_flex_model_equals_sdpa_model_in_inference(length):
    sdpa = tiny_model(seed=3)
    flex = Transformer(tiny_config(attention="flex")).eval()
    flex.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 101, (2, length), generator=torch.Generator().manual_seed(0))
    doc_ids = random_docs(2, length, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(flex(ids), sdpa(ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(flex(ids, doc_ids=doc_ids), sdpa(ids, doc_ids=doc_ids), atol=1e-5, rtol=1e-5)


def test_flex_refuses_cpu_training_with_the_fix():
    model = Transformer(tiny_config(attention="flex"))
    with pytest.raises(RuntimeError, match="attention='flex' has no backward pass on CPU.*attention='sdpa'"):
        model(torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_without_the_extra_names_the_fix():
    message = r"attention='flash' needs flash-attn: pip install 'moxin_lightning\[flash\]'"
    with pytest.raises(ImportError, match=message):
        get_kernel("flash")
    with pytest.raises(ImportError, match=message):
        Transformer(tiny_config(attention="flash"))


def test_unknown_kernel_lists_the_choices():
    with pytest.raises(ValueError, match="unknown attention kernel 'xformers'; choose one of: flash, flex, sdpa"):
        Transformer(tiny_config(attention="xformers"))


def test_a_registered_kernel_is_selected_by_config_alone():
    @register_kernel("longhand-test")
    def longhand(q, k, v, layout):
        mask = layout.dense_mask(q.device).expand(q.shape[0], 1, layout.q_len, layout.k_len)[:, 0]
        return reference_attention(q, k, v, mask)

    assert "longhand-test" in available_kernels()
    base = tiny_model(seed=5)
    custom = Transformer(tiny_config(attention="longhand-test")).eval()
    custom.load_state_dict(base.state_dict())
    ids = torch.randint(0, 101, (2, 3 * W))
    doc_ids = random_docs(2, 3 * W)
    with torch.no_grad():
        torch.testing.assert_close(custom(ids, doc_ids=doc_ids), base(ids, doc_ids=doc_ids), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs the flash extra")
@pytest.mark.parametrize("packed", [False, True])
def test_flash_matches_sdpa_on_cuda(packed):
    torch.manual_seed(0)
    q, k, v = (t.cuda().bfloat16() for t in qkv(2, 3 * 64 + 5, dim=64))
    doc_ids = random_docs(2, q.shape[2]).cuda() if packed else None
    layout = AttentionLayout.self_attention(q.shape[2], 64, doc_ids)
    out = get_kernel("flash")(q, k, v, layout)
    reference_layout = AttentionLayout.self_attention(q.shape[2], 64, doc_ids)
    expected = get_kernel("sdpa")(q.float(), k.float(), v.float(), reference_layout)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
