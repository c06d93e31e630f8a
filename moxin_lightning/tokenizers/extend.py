"""Grow a model's vocabulary (e.g. from the 32K base tokenizer to the MoE tokenizer's joint vocabulary).

Old rows are kept bit for bit, so the model computes exactly what it did on base-vocabulary text. New rows
start at the mean of the old rows (embedding and output head separately): a new token then looks like an
"average" token rather than noise, its logit starts near the typical one instead of dominating or vanishing,
and fine-tuning on the new tokens converges faster (the usual recipe for added tokens; J. Hewitt,
"Initializing new word embeddings for pretrained language models", 2021).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moxin_lightning.model.transformer import Transformer


def _grown(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` with rows appended, each the mean of the old rows (averaged in fp32, then cast back)."""
    extra = weight.detach().float().mean(dim=0, keepdim=True).to(weight.dtype).expand(rows - weight.shape[0], -1)
    return torch.cat([weight.detach(), extra], dim=0)


@torch.no_grad()
def extend_vocabulary(model: Transformer, new_vocab_size: int) -> Transformer:
    """Resize `model.embed` and `model.lm_head` to `new_vocab_size` rows and update `model.config`.

    The model is changed in place (a 7B model is not copied) and returned. Tied embeddings stay tied: the
    one shared matrix grows once. Shrinking is refused because it would drop trained rows.
    """
    old_vocab_size = model.config.vocab_size
    if new_vocab_size < old_vocab_size:
        raise ValueError(
            f"new_vocab_size={new_vocab_size} is smaller than the model's {old_vocab_size}; "
            "extend_vocabulary only grows a vocabulary"
        )
    if model.embed.weight.is_meta:
        raise ValueError("the model is on the meta device; load or initialise its weights before extending them")
    if new_vocab_size == old_vocab_size:
        return model
    embed_weight = model.embed.weight
    model.embed = nn.Embedding.from_pretrained(_grown(embed_weight, new_vocab_size), freeze=False)
    model.embed.weight.requires_grad_(embed_weight.requires_grad)
    head_weight = model.lm_head.weight
    model.lm_head = nn.Linear(model.config.dim, new_vocab_size, bias=False, device="meta")
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    else:
        grown = _grown(head_weight, new_vocab_size)
        model.lm_head.weight = nn.Parameter(grown, requires_grad=head_weight.requires_grad)
    model.config = model.config.replace(vocab_size=new_vocab_size)
    return model
