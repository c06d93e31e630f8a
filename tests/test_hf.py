import io
import json

import pytest
import torch

from moxin_lightning.hf import CheckpointError, export_hf, import_hf, to_hf_state_dict
from moxin_lightning.model import ModelConfig, Transformer

from .conftest import same_weights, tiny_model

transformers = pytest.importorskip("transformers")

# Random tiny geometries: GQA 3:1 and 2:1, MHA, a head_dim that is not dim / n_heads,
# odd vocabulary and FFN sizes, windows shorter than the test sequence, no window, tied embeddings.
HF_CONFIGS = [
    dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
         num_key_value_heads=2, sliding_window=8, rope_theta=10000.0),
    dict(vocab_size=131, hidden_size=36, intermediate_size=53, num_hidden_layers=3, num_attention_heads=6,
         num_key_value_heads=3, head_dim=10, sliding_window=5, rope_theta=500.0, rms_norm_eps=1e-6),
    dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=4, sliding_window=None, rope_theta=1e6),
    dict(vocab_size=77, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=1, sliding_window=13, tie_word_embeddings=True),
]  # fmt: skip


def hf_model(fields, seed=0, attn="eager"):
    torch.manual_seed(seed)
    config = transformers.MistralConfig(max_position_embeddings=256, **fields)
    model = transformers.MistralForCausalLM._from_config(config, attn_implementation=attn).eval()
    with torch.no_grad():  # HF zero-inits nothing we care about, but make norms non-trivial too
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def random_ids(vocab, batch=2, length=37, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fields", HF_CONFIGS, ids=["gqa3", "odd-head-dim", "mha-no-window", "mqa-tied"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_imported_hf_checkpoint_gives_hf_logits(tmp_path, fields, attn):
    reference = hf_model(fields, attn=attn)
    reference.save_pretrained(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf").eval()
    ids = random_ids(fields["vocab_size"])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, atol=1e-4, rtol=0)
    assert ours.config.sliding_window == fields["sliding_window"]
    assert ours.config.rope_theta == fields.get("rope_theta", 10000.0)


@pytest.mark.parametrize("tie", [False, True])
def test_exported_folder_loads_in_transformers_with_the_same_logits(tmp_path, tie):
    model = tiny_model(seed=3, tie_embeddings=tie, rope_theta=321.0)
    export_hf(model, tmp_path / "release")
    reference = transformers.MistralForCausalLM.from_pretrained(tmp_path / "release").eval()
    ids = random_ids(101, length=29)
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, model(ids), atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "release" / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["architectures"] == ["MistralForCausalLM"]
    assert (config["sliding_window"], config["rope_theta"], config["max_position_embeddings"]) == (8, 321.0, 512)
    generation = json.loads((tmp_path / "release" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_import_of_export_is_bit_identical(tmp_path, dtype):
    model = tiny_model(seed=4).to(dtype)
    export_hf(model, tmp_path / "m")
    again = import_hf(tmp_path / "m")
    assert again.config == model.config
    assert again.embed.weight.dtype == dtype and same_weights(model, again)


def test_sharded_export_round_trips_and_loads_in_transformers(tmp_path):
    model = tiny_model(seed=5)
    export_hf(model, tmp_path / "m", max_shard_bytes=20_000)
    shards = sorted(p.name for p in (tmp_path / "m").glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in to_hf_state_dict(model).values())
    again = import_hf(tmp_path / "m")
    assert same_weights(model, again)
    reference = transformers.MistralForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = random_ids(101)
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, model(ids), atol=1e-4, rtol=0)


def test_pytorch_bin_shards_like_moxins_release_load(tmp_path):
    """Moxin-7B ships pytorch_model-000NN.bin shards (no '-of-') plus old rotary inv_freq buffers."""
    model = tiny_model(seed=6)
    export_hf(model, tmp_path / "st")
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    state = to_hf_state_dict(model)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    names = list(state)
    torch.save({n: state[n] for n in names[:10]}, folder / "pytorch_model-00001.bin")
    torch.save({n: state[n] for n in names[10:]}, folder / "pytorch_model-00002.bin")
    again = import_hf(folder)
    assert same_weights(model, again)


def test_pickled_objects_in_bin_checkpoints_are_refused(tmp_path):
    model = tiny_model()
    export_hf(model, tmp_path / "st")
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    buffer = io.BytesIO()
    torch.save({"payload": io.StringIO("not a tensor")}, buffer)
    (folder / "pytorch_model.bin").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="cannot read .*pytorch_model.bin as a tensor-only checkpoint"):
        import_hf(folder)


@pytest.fixture
def exported(tmp_path):
    export_hf(tiny_model(seed=7), tmp_path / "m", max_shard_bytes=20_000)
    return tmp_path / "m"


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_another_architecture_is_named(exported):
    edit_config(exported, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(CheckpointError, match=r"model_type='gpt2' \(\['GPT2LMHeadModel'\]\); only Mistral-format"):
        import_hf(exported)


def test_a_missing_shard_is_named(exported):
    victim = sorted(exported.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard .*{victim.name} listed in model.safetensors.index.json"):
        import_hf(exported)


def test_a_tensor_of_the_wrong_shape_is_named(exported):
    edit_config(exported, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.gate_proj.weight' .* has shape \(80, 48\), "
                                              r"config.json implies \(96, 48\)"):  # fmt: skip
        import_hf(exported)


def test_missing_and_foreign_tensors_are_named(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model()
    export_hf(model, tmp_path / "m")
    state = to_hf_state_dict(model)
    del state["model.norm.weight"]
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks tensor 'model.norm.weight'; the checkpoint is incomplete"):
        import_hf(tmp_path / "m")
    state["model.norm.weight"] = torch.ones(48)
    state["model.vision_tower.weight"] = torch.ones(2)
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.vision_tower.weight'"):
        import_hf(tmp_path / "m")


def test_no_config_or_no_weights(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json; point at a Hugging Face model folder"):
        import_hf(tmp_path)
    export_hf(tiny_model(), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights: expected model.safetensors"):
        import_hf(tmp_path / "m")


def test_export_refuses_to_overwrite_unless_asked(tmp_path):
    export_hf(tiny_model(seed=1), tmp_path / "m")
    with pytest.raises(FileExistsError, match="already exists; choose another folder or pass overwrite=True"):
        export_hf(tiny_model(seed=2), tmp_path / "m")
    export_hf(tiny_model(seed=2), tmp_path / "m", overwrite=True)
    assert torch.equal(import_hf(tmp_path / "m").embed.weight, tiny_model(seed=2).embed.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_crash_mid_export_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.torch

    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(tensors, filename, metadata=metadata)

    real_save = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_hf(tiny_model(), tmp_path / "m", max_shard_bytes=20_000)
    assert list(tmp_path.iterdir()) == []


def test_export_ships_the_tokenizer(tmp_path):
    import sentencepiece as spm

    text = ["The quick brown fox jumps over the lazy dog.", "Moxin is a fully open language model."] * 50
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=buffer, vocab_size=300, model_type="bpe",
        byte_fallback=True, hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
    )  # fmt: skip
    (tmp_path / "tokenizer.model").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="tokenizer has 300 pieces but the model's vocab_size is 101"):
        export_hf(tiny_model(), tmp_path / "m", tokenizer=tmp_path / "tokenizer.model")
    assert not (tmp_path / "m").exists()
    export_hf(tiny_model(vocab_size=300), tmp_path / "m", tokenizer=tmp_path / "tokenizer.model")
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == buffer.getvalue()
    tokenizer_config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "LlamaTokenizer" and tokenizer_config["eos_token"] == "</s>"
    with pytest.raises(FileNotFoundError, match="tokenizer .*nope.model not found"):
        export_hf(tiny_model(), tmp_path / "m2", tokenizer=tmp_path / "nope.model")
    assert not (tmp_path / "m2").exists()


def test_meta_moxin_7b_config_round_trips_through_hf_json():
    from moxin_lightning.hf import config_from_hf, config_to_hf

    config = ModelConfig.from_name("moxin-7b")
    hf = config_to_hf(config, torch.bfloat16)
    assert hf["num_hidden_layers"] == 36 and hf["sliding_window"] == 4096 and hf["dtype"] == "bfloat16"
    assert config_from_hf(hf) == config
    with torch.device("meta"):
        assert Transformer(config_from_hf(hf)).num_params() == 8_114_180_096
