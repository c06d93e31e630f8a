import math

import pytest
import torch
import torch.nn.functional as F

from moxin_lightning.model import Transformer
from moxin_lightning.model.rope import positions_from_documents

from .conftest import tiny_config, tiny_model


def test_positions_restart_at_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    assert positions_from_documents(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], list(range(9))]


def test_packed_row_gives_each_document_its_unpacked_logits():
    model = tiny_model(seed=1)
    lengths = [5, 19, 3, 12]  # one document longer than the window (8), one shorter
    docs = [torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    packed = torch.cat(docs).unsqueeze(0)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    with torch.no_grad():
        packed_logits = model(packed, doc_ids=doc_ids)[0]
        separate = torch.cat([model(d.unsqueeze(0))[0] for d in docs])
    torch.testing.assert_close(packed_logits, separate, atol=1e-5, rtol=1e-5)


def test_receptive_field_is_layers_times_window_minus_one():
    """With 2 layers of window 8, the logits at position 30 depend on positions 16..30 and nothing earlier."""
    model = tiny_model(seed=2)
    ids = torch.randint(0, 101, (1, 40))
    embeddings = model.embed(ids).detach().requires_grad_(True)
    model.embed.forward = lambda _ids: embeddings  # feed our leaf tensor through the real forward
    model(ids)[0, 30].sum().backward()
    influence = embeddings.grad[0].abs().sum(-1)
    first = 30 - 2 * (8 - 1)
    assert torch.all(influence[:first] == 0)
    assert torch.all(influence[first:31] > 0)
    assert torch.all(influence[31:] == 0)


def test_meta_build_then_materialise_initialises_every_weight():
    config = tiny_config(vocab_size=4096, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256, n_layers=4)
    with torch.device("meta"):
        model = Transformer(config)
    assert model.embed.weight.is_meta
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert abs(model.embed.weight.std().item() - 0.02) < 1e-3
    assert abs(model.blocks[0].attn.o_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 1e-3
    assert torch.equal(model.blocks[3].mlp_norm.weight, torch.ones(128))
    ids = torch.randint(0, 4096, (2, 64))
    loss = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert abs(loss.item() - math.log(4096)) < 0.05  # an untrained model predicts uniformly


def test_tied_embeddings_share_one_tensor():
    model = tiny_model(tie_embeddings=True)
    assert model.lm_head.weight is model.embed.weight
    assert model.num_params() == tiny_config(tie_embeddings=True).num_params()


def test_bf16_forward_tracks_fp32():
    model = tiny_model(seed=4)
    ids = torch.randint(0, 101, (2, 24))
    with torch.no_grad():
        full = model(ids)
        half = model.to(torch.bfloat16)(ids)
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.05


def test_overlong_sequence_is_refused_before_any_work():
    model = tiny_model(max_seq_len=16)
    with pytest.raises(ValueError, match="sequence of 17 tokens exceeds max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_training_steps_lower_the_loss_on_a_repeated_batch():
    torch.manual_seed(0)
    model = Transformer(tiny_config()).train()
    ids = torch.randint(0, 101, (4, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 4.4 and losses[-1] < 0.5 * losses[0]
