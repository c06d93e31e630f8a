import pytest
import torch

from moxin_lightning.generate import generate, sample
from moxin_lightning.model import RollingKVCache

from .conftest import tiny_config, tiny_model

W = 8


def prompt(length, seed):
    return torch.randint(0, 101, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def rescore(model, prompt_ids, completion):
    """Log-softmax of one full forward over prompt + completion, at the completion's positions."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + completion]))[0].float()
    return torch.log_softmax(logits, -1)[len(prompt_ids) - 1 : -1]


def assert_matches_full_recompute(model, prompts, result):
    for p, tokens, logprobs in zip(prompts, result.tokens, result.logprobs, strict=True):
        reference = rescore(model, p, tokens)
        assert reference.argmax(-1).tolist() == tokens
        expected = reference.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("prompt_len", "new"), [(3, 4), (4, 4), (5, 4), (1, 7), (1, 8), (1, 9), (20, 15), (37, 40)])
def test_greedy_generation_equals_full_recompute_around_the_window(prompt_len, new):
    """Total lengths W-1, W, W+1 (from a long or a one-token prompt) and several windows."""
    model = tiny_model(seed=prompt_len)
    prompts = [prompt(prompt_len, seed=new)]
    assert_matches_full_recompute(model, prompts, sample(model, prompts, new))


@pytest.mark.parametrize("chunk", [1, 3, W, 5 * W])
def test_chunked_prefill_of_long_prompts_equals_full_recompute(chunk):
    model = tiny_model(seed=11)
    prompts = [prompt(4 * W + 3, seed=1), prompt(W - 1, seed=2), prompt(W + 1, seed=3)]
    result = sample(model, prompts, 2 * W + 1, prefill_chunk=chunk)
    assert_matches_full_recompute(model, prompts, result)


def test_ragged_batch_equals_one_prompt_at_a_time():
    model = tiny_model(seed=12)
    prompts = [prompt(n, seed=n) for n in (1, 7, 8, 9, 30)]
    batched = generate(model, prompts, 12)
    single = [generate(model, [p], 12)[0] for p in prompts]
    assert batched == single
    assert_matches_full_recompute(model, prompts, sample(model, prompts, 12))


def test_full_attention_model_uses_a_full_cache():
    model = tiny_model(seed=13, sliding_window=None)
    prompts = [prompt(5, 1), prompt(19, 2)]
    assert_matches_full_recompute(model, prompts, sample(model, prompts, 10))


def test_cache_memory_stops_growing_at_the_window():
    config = tiny_config()
    short = RollingKVCache(config, 2, max_len=W - 2)
    long = RollingKVCache(config, 2, max_len=50 * W)
    assert short.slots == W - 2 and long.slots == W
    per_slot = 2 * config.n_layers * 2 * config.n_kv_heads * config.head_dim * 4
    assert long.nbytes == per_slot * W and short.nbytes == per_slot * (W - 2)


def test_eos_ends_a_row_and_is_kept():
    model = tiny_model(seed=14)
    prompts = [prompt(6, 1), prompt(9, 2)]
    free = generate(model, prompts, 10)
    eos = free[0][3]  # make the 4th greedy token of row 0 the end marker
    stopped = generate(model, prompts, 10, eos_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    cut = free[1].index(eos) + 1 if eos in free[1] else 10
    assert stopped[1] == free[1][:cut]


def test_sampling_follows_the_model_distribution():
    model = tiny_model(seed=15)
    p = prompt(5, 3)
    draws = torch.tensor(generate(model, [p] * 20000, 1, temperature=0.05, seed=0)).flatten()
    empirical = torch.bincount(draws, minlength=101).float() / draws.numel()
    with torch.no_grad():
        expected = (model(torch.tensor([p]))[0, -1] / 0.05).softmax(-1)
    assert expected.max() < 0.5  # several tokens share the mass, so this tests the draw, not an argmax
    assert 0.5 * (empirical - expected).abs().sum() < 0.03  # total variation distance


def test_top_k_and_top_p_restrict_the_support():
    model = tiny_model(seed=16)
    p = prompt(5, 4)
    with torch.no_grad():
        probs = model(torch.tensor([p]))[0, -1].softmax(-1)
    top5 = set(probs.topk(5).indices.tolist())
    draws = generate(model, [p] * 500, 1, temperature=1.0, top_k=5, seed=1)
    assert {d[0] for d in draws} <= top5
    ranked = probs.sort(descending=True)
    nucleus_size = int((ranked.values.cumsum(0) < 0.3).sum()) + 1
    nucleus = set(ranked.indices[:nucleus_size].tolist())
    draws = generate(model, [p] * 500, 1, temperature=1.0, top_p=0.3, seed=2)
    assert {d[0] for d in draws} == nucleus


def test_sampling_is_reproducible_by_seed_and_top_k_1_is_greedy():
    model = tiny_model(seed=17)
    prompts = [prompt(4, 1), prompt(11, 2)]
    first = generate(model, prompts, 20, temperature=1.0, seed=123)
    assert first == generate(model, prompts, 20, temperature=1.0, seed=123)
    assert first != generate(model, prompts, 20, temperature=1.0, seed=124)
    assert generate(model, prompts, 20, temperature=0.7, top_k=1, seed=5) == generate(model, prompts, 20)


@pytest.mark.parametrize(
    ("prompts", "kwargs", "message"),
    [
        ([[]], {}, "every prompt needs at least one token"),
        ([[1, 500]], {}, "token id 500 is outside the model's vocabulary of 101"),
        ([[1] * 500], {"max_new_tokens": 13}, "reaches 513 tokens, beyond max_seq_len=512"),
        ([[1]], {"top_p": 0.0}, "0 < top_p <= 1"),
        ([[1]], {"max_new_tokens": 0}, "max_new_tokens=0 must be >= 1"),
    ],
)
def test_bad_requests_are_refused(prompts, kwargs, message):
    model = tiny_model()
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, prompts, **kwargs)


@pytest.mark.slow
def test_compiled_decoding_equals_eager_and_full_recompute():
    model = tiny_model(seed=18)
    prompts = [prompt(3, 1), prompt(2 * W + 1, 2)]  # one row fills the buffer during decoding, one during prefill
    eager = sample(model, prompts, 3 * W)
    compiled = sample(model, prompts, 3 * W, compile=True)
    assert compiled.tokens == eager.tokens
    torch.testing.assert_close(torch.tensor(compiled.logprobs), torch.tensor(eager.logprobs), atol=1e-5, rtol=0)
    assert_matches_full_recompute(model, prompts, compiled)


def test_a_vocabulary_limit_rules_out_the_ids_beyond_it():
    """Greedy decoding with `vocab_limit` is the argmax over the allowed ids of a full recompute at every step."""
    model = tiny_model(seed=4)
    start = prompt(12, seed=4)
    tokens = generate(model, [start], 20, vocab_limit=30)[0]
    assert len(tokens) == 20 and max(tokens) < 30
    with torch.no_grad():
        logits = model(torch.tensor([start + tokens]))[0, len(start) - 1 : -1]
    assert tokens == logits[:, :30].argmax(dim=-1).tolist()
    assert max(generate(model, [start], 20)[0]) >= 30  # without the limit this model does pick higher ids
