"""The decoding engine: continuous batching within a KV budget gives the same greedy tokens as a full recompute
whatever the budget, samples the model's distribution reproducibly, prefills a shared prompt once and never holds
more cache than its budget."""

import pytest
import torch

from moxin_lightning.decoding import Sampling, decode, draw
from moxin_lightning.generate import generate, sample
from moxin_lightning.model import RollingKVCache

from .conftest import tiny_config, tiny_model


def prompt(length, seed):
    return torch.randint(0, 101, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def row_bytes(max_len):
    return RollingKVCache.bytes_per_row(tiny_config(), max_len, torch.float32)


def budget_for(slots, max_len):
    """A budget holding `slots` decoding rows plus the one staging row a prefill needs."""
    return row_bytes(max_len) * (slots + 1)


def full_logits(model, prompt_ids, completion):
    """Logits of one full forward over prompt + completion, at the positions predicting the completion."""
    with torch.no_grad():
        return model(torch.tensor([prompt_ids + completion]))[0, len(prompt_ids) - 1 : -1].float()


PROMPTS = [prompt(n, seed=n) for n in (3, 9, 1, 14, 6, 20, 2)]


def test_cache_rows_copy_in_and_reset():
    config = tiny_config()
    source, target = RollingKVCache(config, 2, max_len=30), RollingKVCache(config, 3, max_len=30)
    for tensor in (*source.keys, *source.values):
        tensor.normal_()
    source.slot_position = torch.arange(2 * source.slots).view(2, -1)
    target.copy_rows(source, [1, 0], [2, 0])
    for mine, theirs in zip((*target.keys, *target.values), (*source.keys, *source.values), strict=True):
        assert torch.equal(mine[2], theirs[1]) and torch.equal(mine[0], theirs[0]) and not mine[1].any()
    assert target.slot_position.tolist() == [
        source.slot_position[0].tolist(),
        [-1] * 8,
        source.slot_position[1].tolist(),
    ]
    target.reset_rows([0, 2])
    assert (target.slot_position == -1).all()
    assert RollingKVCache.bytes_per_row(config, 30, torch.float32) == RollingKVCache(config, 1, max_len=30).nbytes
    with pytest.raises(ValueError, match="cannot copy rows of a 5-slot cache into a 8-slot one"):
        target.copy_rows(RollingKVCache(config, 1, max_len=5), [0], [0])


@pytest.mark.parametrize("slots", [1, 3, len(PROMPTS)])
def test_greedy_is_the_full_recompute_argmax_whatever_the_budget(slots):
    model = tiny_model(seed=21)
    free = generate(model, PROMPTS, 12)
    eos = free[0][4]  # rows end at different steps, so slots are refilled mid-run
    result = sample(model, PROMPTS, 12, eos_id=eos, kv_budget_bytes=budget_for(slots, 32))
    assert result.stats.slots == slots
    lengths = [len(t) for t in result.tokens]
    assert min(lengths) < 12 and max(lengths) == 12
    for p, tokens in zip(PROMPTS, result.tokens, strict=True):
        assert full_logits(model, p, tokens).argmax(-1).tolist() == tokens
        assert eos not in tokens[:-1] and (tokens[-1] == eos or len(tokens) == 12)
    assert result.tokens == [generate(model, [p], 12, eos_id=eos)[0] for p in PROMPTS]


def test_per_request_limits_and_one_slot_steps_only_live_rows():
    model = tiny_model(seed=22)
    limits = [5, 1, 9, 3, 2, 7, 4]
    result = decode(model, PROMPTS, limits, kv_budget_bytes=budget_for(1, 29))
    assert [len(t) for t in result.tokens] == limits
    assert result.tokens == [generate(model, [p], n)[0] for p, n in zip(PROMPTS, limits, strict=True)]
    stats = result.stats
    assert stats.slots == 1 and stats.new_tokens == sum(limits)
    assert stats.decode_steps == sum(n - 1 for n in limits) and stats.occupancy == 1.0
    assert stats.prefills == len(PROMPTS) and stats.prefill_tokens == sum(len(p) for p in PROMPTS)


def test_once_nothing_waits_finished_rows_stop_being_computed():
    model = tiny_model(seed=25)
    limits = [12, 1, 2, 1, 3, 2, 1]  # most rows end early, one runs to its limit
    result = decode(model, PROMPTS, limits)  # the default budget holds every row at once
    assert result.tokens == [generate(model, [p], n)[0] for p, n in zip(PROMPTS, limits, strict=True)]
    stats = result.stats
    assert stats.slots == len(PROMPTS) and stats.decode_steps == max(limits) - 1
    # Rows computed per step: 7 (4 of 7 live, more than half), then 2 (shrunk to the 2 live rows), then 1 for
    # the 9 steps left to the longest row; without shrinking it would be 7 for each of the 11 steps.
    assert stats.live_row_steps == sum(n - 1 for n in limits) == 15
    assert stats.row_steps == 7 + 2 + 1 * 9 == 18
    assert stats.occupancy == pytest.approx(15 / 18)


def test_more_requests_than_slots_reuse_slots_within_the_budget(monkeypatch):
    model = tiny_model(seed=23)
    created = []
    original = RollingKVCache.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.slot_position.device.type != "meta":  # not the per-row size query
            created.append((self, self.batch_size, self.nbytes))  # sizes at creation: the end of a run shrinks

    monkeypatch.setattr(RollingKVCache, "__init__", recording)
    budget = budget_for(2, 32)  # three rows: two slots and a staging row
    result = sample(model, PROMPTS, 12, temperature=1.0, seed=3, kv_budget_bytes=budget)
    (_, main_rows, main_bytes), *staging = created
    assert main_rows == 2 and all(rows == 1 for _, rows, _ in staging) and len(staging) == len(PROMPTS)
    assert main_bytes + max(nbytes for *_, nbytes in staging) <= budget
    assert result.stats.peak_kv_bytes == main_bytes + staging[0][2] <= budget
    assert [len(t) for t in result.tokens] == [12] * len(PROMPTS)
    assert 0 < result.stats.occupancy <= 1


def test_a_request_beyond_the_budget_is_a_one_line_error():
    model = tiny_model()
    need = 2 * row_bytes(8)
    with pytest.raises(ValueError, match=rf"needs {need} bytes of KV cache .* beyond kv_budget_bytes=1000; raise"):
        generate(model, [[1, 2, 3]], 5, kv_budget_bytes=1000)
    assert len(generate(model, [[1, 2, 3]], 5, kv_budget_bytes=need)[0]) == 5


def test_a_shared_prompt_is_prefilled_once_and_decodes_as_separate_prefills(monkeypatch):
    model = tiny_model(seed=24)
    group_prompts = [prompt(11, seed=1), prompt(5, seed=2)]
    prompts = [p for p in group_prompts for _ in range(4)]  # P=2 prompts x G=4 completions
    prompts = prompts[::2] + prompts[1::2]  # interleaved: the engine still groups them
    tokens_seen = []
    original = type(model).hidden_states

    def counting(self, input_ids, **kwargs):
        tokens_seen.append(int((kwargs["positions"] >= 0).sum()) if kwargs.get("cache") else input_ids.numel())
        return original(self, input_ids, **kwargs)

    monkeypatch.setattr(type(model), "hidden_states", counting)
    shared = sample(model, prompts, 10, kv_budget_bytes=budget_for(3, 21))  # a group spans two refills
    assert sum(tokens_seen) == 11 + 5 and shared.stats.prefills == 2 and shared.stats.prefill_tokens == 16
    monkeypatch.undo()
    separate = [generate(model, [p], 10)[0] for p in prompts]
    assert shared.tokens == separate


def test_sampling_is_reproducible_for_a_seed_and_budget():
    model = tiny_model(seed=25)
    options = dict(temperature=1.0, top_p=0.9, seed=7, kv_budget_bytes=budget_for(3, 32))
    first = sample(model, PROMPTS, 12, **options)
    again = sample(model, PROMPTS, 12, **options)
    assert first.tokens == again.tokens and first.logprobs == again.logprobs
    assert first.tokens != sample(model, PROMPTS, 12, **{**options, "seed": 8}).tokens


def test_sampled_log_probs_are_the_full_recompute_s():
    model = tiny_model(seed=26)
    result = sample(model, PROMPTS, 15, temperature=1.0, seed=1, eos_id=7, kv_budget_bytes=budget_for(3, 35))
    for p, tokens, logprobs in zip(PROMPTS, result.tokens, result.logprobs, strict=True):
        expected = torch.log_softmax(full_logits(model, p, tokens), -1).gather(1, torch.tensor(tokens)[:, None])
        torch.testing.assert_close(torch.tensor(logprobs), expected.squeeze(1), atol=1e-4, rtol=0)


def test_continuously_batched_draws_follow_the_model_distribution():
    """6000 one-token requests through 50 slots (120 refills of one shared prefill) draw as the model says
    (the approach of test_generate's full-batch test)."""
    model = tiny_model(seed=15)
    p = prompt(5, 3)
    result = sample(model, [p] * 6000, 1, temperature=0.05, seed=0, kv_budget_bytes=budget_for(50, 6))
    assert result.stats.slots == 50 and result.stats.prefills == 1
    draws = torch.tensor(result.tokens).flatten()
    empirical = torch.bincount(draws, minlength=101).float() / draws.numel()
    with torch.no_grad():
        expected = (model(torch.tensor([p]))[0, -1] / 0.05).softmax(-1)
    assert expected.max() < 0.5  # several tokens share the mass, so this tests the draw, not an argmax
    assert 0.5 * (empirical - expected).abs().sum() < 0.04  # total variation distance


def test_sample_never_draws_beyond_the_vocabulary_limit():
    model = tiny_model(seed=4)
    unrestricted = sample(model, PROMPTS, 20, temperature=2.0, seed=0)
    assert max(max(t) for t in unrestricted.tokens) >= 30
    limited = sample(model, PROMPTS, 20, temperature=2.0, seed=0, vocab_limit=30, kv_budget_bytes=budget_for(3, 40))
    assert max(max(t) for t in limited.tokens) < 30


def test_sampling_settings_are_checked_once_for_every_caller():
    model = tiny_model()
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        decode(model, [[1]], 3, Sampling(temperature=1.0, top_p=0.0))
    with pytest.raises(ValueError, match="2 token limits for 1 prompts"):
        decode(model, [[1]], [3, 4])


def test_draw_matches_its_probabilities_and_never_picks_a_zero():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.1, 0.0, 0.0, 0.0, 0.0, 0.9]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([draw(probs, generator) for _ in range(20_000)])  # (draws, rows)
    for row in range(2):
        frequency = torch.bincount(draws[:, row], minlength=6).double() / len(draws)
        assert frequency[probs[row] == 0].sum() == 0
        # Binomial standard error at 20,000 draws is at most 0.0036; 4 of them.
        assert torch.allclose(frequency, probs[row].double(), atol=0.015)
    assert torch.equal(draw(probs, torch.Generator().manual_seed(0)), draws[0])  # a fixed seed, the same draw
