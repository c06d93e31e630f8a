"""Hugging Face Mistral-format import and export (config.json + safetensors or pytorch_model*.bin).

The released Moxin-7B checkpoints are in this format, and `transformers.MistralForCausalLM`
loads what `export_hf` writes. Our module names map one to one onto HF's, so conversion is
a renaming; no weight is permuted (both use the half-split RoPE layout).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from moxin_lightning.atomic import written_as_a_whole
from moxin_lightning.json_files import read_json
from moxin_lightning.model.config import ModelConfig
from moxin_lightning.model.transformer import Transformer

# (our name, HF name) patterns; {i} is a block index.
_NAME_PAIRS = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("blocks.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blocks.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    *[
        (f"blocks.{{i}}.attn.{p}.weight", f"model.layers.{{i}}.self_attn.{p}.weight")
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    ],
    *[
        (f"blocks.{{i}}.mlp.{p}.weight", f"model.layers.{{i}}.mlp.{p}.weight")
        for p in ("gate_proj", "up_proj", "down_proj")
    ],
]
# Buffers some older checkpoints (transformers 4.3x LLaMA) saved; recomputed here, so ignored.
_IGNORED_HF_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")
_SUPPORTED_MODEL_TYPES = ("mistral", "llama")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as a Mistral-format model."""


def hf_name(name: str) -> str:
    """Our parameter name -> Hugging Face Mistral's."""
    return _rename(name, 0, 1)


def our_name(name: str) -> str:
    """Hugging Face Mistral parameter name -> ours."""
    return _rename(name, 1, 0)


def _rename(name: str, src: int, dst: int) -> str:
    for pair in _NAME_PAIRS:
        pattern = "^" + re.escape(pair[src]).replace(r"\{i\}", r"(\d+)") + "$"
        match = re.match(pattern, name)
        if match:
            return pair[dst].replace("{i}", match.group(1)) if match.groups() else pair[dst]
    raise KeyError(name)


# ----------------------------------------------------------------------------------------------
# config


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict; anything we cannot represent is an error."""
    model_type = hf.get("model_type")
    if model_type not in _SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"config.json has model_type={model_type!r} ({hf.get('architectures')}); "
            "only Mistral-format checkpoints (MistralForCausalLM, LlamaForCausalLM) can be imported"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act={hf['hidden_act']!r} is not supported; Moxin/Mistral use 'silu'")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError("checkpoints with attention or MLP biases are not supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"rope scaling {rope_type!r} is not supported; only plain RoPE (with any theta) is")
    n_heads = hf["num_attention_heads"]
    return ModelConfig(
        **{
            "vocab_size": hf["vocab_size"],
            "dim": hf["hidden_size"],
            "n_layers": hf["num_hidden_layers"],
            "n_heads": n_heads,
            "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
            "head_dim": hf.get("head_dim") or hf["hidden_size"] // n_heads,
            "ffn_dim": hf["intermediate_size"],
            "norm_eps": hf.get("rms_norm_eps", 1e-5),
            "rope_theta": float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
            "sliding_window": hf.get("sliding_window"),
            "max_seq_len": hf.get("max_position_embeddings", 32768),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "init_std": hf.get("initializer_range", 0.02),
            "bos_id": _first_id(hf.get("bos_token_id"), 1),
            "eos_id": _first_id(hf.get("eos_token_id"), 2),
            **overrides,
        }
    )


def config_to_hf(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """A config.json that transformers reads as MistralForCausalLM."""
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "initializer_range": config.init_std,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "sliding_window": config.sliding_window,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": config.bos_id,
        "eos_token_id": config.eos_id,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _first_id(value: Any, default: int) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else int(value)


# ----------------------------------------------------------------------------------------------
# import


_REDOWNLOAD = "download or export the folder again"


def import_hf(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    **config_overrides: Any,
) -> Transformer:
    """Load a Mistral-format folder as a Transformer (weights keep their stored dtype unless `dtype`)."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no config.json; point at a Hugging Face model folder")
    config = config_from_hf(read_json(config_file, _REDOWNLOAD), **config_overrides)
    hf_state = _read_weights(folder)
    state = _to_our_state(hf_state, config, folder)
    with torch.device("meta"):
        model = Transformer(config)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.to(device)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    for index_name, loader in (
        ("model.safetensors.index.json", _load_safetensors),
        ("pytorch_model.bin.index.json", _load_bin),
    ):
        index_file = folder / index_name
        if index_file.is_file():
            files = sorted(set(read_json(index_file, _REDOWNLOAD).get("weight_map", {}).values()))
            return _load_all(folder, files, loader, f"listed in {index_name}")
    if (folder / "model.safetensors").is_file():
        return _load_safetensors(folder / "model.safetensors")
    bins = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    if bins:
        return _load_all(folder, bins, _load_bin, "")
    raise CheckpointError(f"{folder} has no weights: expected model.safetensors[.index.json] or pytorch_model*.bin")


def _load_all(folder: Path, files: Iterable[str], loader, where: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name in files:
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"missing shard {file} {where}; download the complete checkpoint".replace("  ", " "))
        state.update(loader(file))
    return state


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(file))


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - reported with the file name, one line
        raise CheckpointError(f"cannot read {file} as a tensor-only checkpoint: {str(error).splitlines()[0]}") from None


def _to_our_state(hf_state: dict[str, torch.Tensor], config: ModelConfig, folder: Path) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(config).state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    state: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state.items():
        if _IGNORED_HF_TENSORS.match(name):
            continue
        try:
            ours = our_name(name)
        except KeyError:
            raise CheckpointError(f"unexpected tensor {name!r} in {folder}: not part of a Mistral model") from None
        if ours == "lm_head.weight" and config.tie_embeddings:
            continue
        if ours not in expected:
            raise CheckpointError(f"tensor {name!r} in {folder} does not fit a {config.n_layers}-layer model")
        if tuple(tensor.shape) != tuple(expected[ours]):
            raise CheckpointError(
                f"tensor {name!r} in {folder} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(expected[ours])}"
            )
        state[ours] = tensor
    missing = [hf_name(k) for k in expected if k not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{folder} lacks tensor {missing[0]!r}{more}; the checkpoint is incomplete")
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return state


# ----------------------------------------------------------------------------------------------
# export


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """HF-named, contiguous tensors; a tied output head is written once (as the embedding)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        state[hf_name(name)] = tensor.detach().contiguous()
    return state


def export_hf(
    model: Transformer,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write a Hugging Face Mistral folder atomically (built aside, then renamed into place).

    tokenizer: a SentencePiece `tokenizer.model` path, or a `moxin_lightning.tokenizers.Tokenizer`.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another folder or pass overwrite=True")
    tokenizer = _as_tokenizer(tokenizer, model.config)
    state = to_hf_state_dict(model)
    dtype = next(iter(state.values())).dtype
    with written_as_a_whole(out) as staging:
        shards = _plan_shards(state, max_shard_bytes)
        weight_map = {}
        for number, names in enumerate(shards, start=1):
            file = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: state[n] for n in names}, str(staging / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in names})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            _write_json(
                staging / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
            )
        config = model.config
        _write_json(staging / "config.json", config_to_hf(config, dtype))
        _write_json(staging / "generation_config.json", {"bos_token_id": config.bos_id, "eos_token_id": config.eos_id})
        if tokenizer is not None:
            tokenizer.save(staging)
    return out


def _plan_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _as_tokenizer(tokenizer: Any, config: ModelConfig) -> Any:
    """A tokenizer object (a `tokenizer.model` path is loaded); refused if larger than the model's vocabulary."""
    if tokenizer is None:
        return None
    if not hasattr(tokenizer, "save"):
        from moxin_lightning.tokenizers import SentencePieceTokenizer

        tokenizer = SentencePieceTokenizer(tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is {config.vocab_size}; "
            "export with the tokenizer the model was trained with"
        )
    return tokenizer


def _write_json(file: Path, data: dict[str, Any]) -> None:
    file.write_text(json.dumps(data, indent=2) + "\n")
