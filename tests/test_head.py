"""The model's one output-head surface (`Transformer.head`): logits, target log-probabilities and the fused loss
from final hidden states, and `forward(logits_at=...)`, which a prefill uses to ask only for each prompt's last."""

from __future__ import annotations

import torch

from moxin_lightning.losses import IGNORE_INDEX

from .conftest import tiny_model


def test_head_gives_what_forward_gives_from_the_same_hidden_states():
    model = tiny_model(seed=5)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = IGNORE_INDEX
    hidden = model.hidden_states(ids)
    logits = model(ids)
    torch.testing.assert_close(model.head(hidden), logits, rtol=0, atol=0)
    loss, count = model.head(hidden, targets)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert int(count) == 2 * 8
    logprobs = model.head(hidden, targets, target_logprobs=True)
    picked = logits.log_softmax(-1).gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(logprobs, torch.where(targets == IGNORE_INDEX, 0.0, picked), rtol=1e-5, atol=1e-5)


def test_logits_at_returns_one_column_of_each_row():
    model = tiny_model(seed=6)
    ids = torch.randint(3, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
    columns = torch.tensor([6, 0, 3])
    picked = model(ids, logits_at=columns)
    assert picked.shape == (3, model.config.vocab_size)
    torch.testing.assert_close(picked, model(ids)[torch.arange(3), columns], rtol=1e-5, atol=1e-6)
