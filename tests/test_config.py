import pytest
import torch

from moxin_lightning.model import PRESETS, ModelConfig, RollingKVCache, Transformer


def test_moxin_7b_has_exactly_the_published_parameter_count():
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_name("moxin-7b"))
    assert model.num_params() == 8_114_180_096
    assert ModelConfig.from_name("moxin-7b").num_params() == 8_114_180_096


def test_mistral_7b_parameter_count():
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_name("mistral-7b"))
    assert model.num_params() == 7_241_732_096


def test_moxin_7b_preset_fields():
    config = ModelConfig.from_name("moxin-7b")
    assert (config.n_layers, config.dim, config.ffn_dim, config.n_heads, config.n_kv_heads, config.head_dim) == (
        36, 4096, 14336, 32, 8, 128,
    )  # fmt: skip
    assert (config.vocab_size, config.rope_theta, config.sliding_window) == (32000, 1e4, 4096)
    assert config.max_seq_len == 32768
    assert config.norm_eps == 1e-5 and config.tie_embeddings is False


@pytest.mark.parametrize("name", [n for n in PRESETS if "tiny" in n or "small" in n])
def test_tiny_presets_are_laptop_sized_and_count_matches(name):
    config = ModelConfig.from_name(name)
    with torch.device("meta"):
        model = Transformer(config)
    assert model.num_params() == config.num_params()
    assert 1_000_000 <= config.num_params() <= 130_000_000


def test_overrides_and_unknown_preset():
    assert ModelConfig.from_name("moxin-7b", attention="flex").attention == "flex"
    with pytest.raises(ValueError, match="unknown model preset 'moxin-8b'; choose one of: .*moxin-7b"):
        ModelConfig.from_name("moxin-8b")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(n_heads=6, n_kv_heads=4), "must be a multiple of n_kv_heads=4"),
        (dict(dim=50, n_heads=6), "not divisible by n_heads=6; set head_dim"),
        (dict(sliding_window=0), "sliding_window=0 must be >= 1"),
        (dict(head_dim=7), "head_dim=7 must be even"),
    ],
)
def test_invalid_configs_are_one_line_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{"dim": 48, "n_heads": 6, "n_kv_heads": 2, **fields})


def test_rolling_cache_size_for_moxin_7b_is_bounded_by_the_window():
    config = ModelConfig.from_name("moxin-7b")
    for length in (4097, 8192, 32768):
        cache = RollingKVCache(config, 1, max_len=length, dtype=torch.bfloat16, device="meta")
        assert cache.nbytes == 603_979_776  # 576 MiB
    full = RollingKVCache(config.replace(sliding_window=None), 1, max_len=32768, dtype=torch.bfloat16, device="meta")
    assert full.nbytes == 8 * 603_979_776


def test_flops_per_token_counts_matmuls_and_windowed_attention():
    config = ModelConfig.from_name("moxin-7b")
    matmul_params = config.num_params() - 32000 * 4096 - 4096 * 73  # embedding and norms do no matmul
    assert config.flops_per_token(2048) == 6 * matmul_params + 12 * 36 * 32 * 128 * 2048
    assert config.flops_per_token(32768) == config.flops_per_token(4096)  # the window caps attention
