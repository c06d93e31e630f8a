"""samples.json: greedy continuations of the release's prompts, so a reader sees what the model does."""

from __future__ import annotations

from typing import Any

from moxin_lightning.model.transformer import Transformer
from moxin_lightning.release.contents import Release


def sample_outputs(model: Transformer, release: Release) -> list[dict[str, Any]]:
    """Greedy continuations of the release's prompts (deterministic, so a reader can reproduce them).

    `tokens` are the ids as generated; `completion` decodes those the tokenizer has (a model's vocabulary may
    be padded past the tokenizer's, and an undertrained model can pick a padding id) up to the end token."""
    from moxin_lightning.generate import generate

    tokenizer = release.tokenizer
    prompts = [tokenizer.encode(prompt, bos=True) for prompt in release.sample_prompts]
    was_training = model.training
    model.eval()
    try:
        new = generate(model, prompts, release.sample_tokens, eos_id=tokenizer.eos_id)
    finally:
        model.train(was_training)
    samples = []
    for prompt, tokens in zip(release.sample_prompts, new, strict=True):
        known = [t for t in tokens if t < tokenizer.vocab_size and t != tokenizer.eos_id]
        samples.append({"prompt": prompt, "completion": tokenizer.decode(known), "tokens": tokens})
    return samples
