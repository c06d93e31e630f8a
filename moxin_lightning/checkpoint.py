"""Open any checkpoint the platform writes, for inference: `eval`, `generate`, `export` and the Python API.

Three kinds of checkpoint reach these commands:

* a release or Hugging Face folder (`config.json` + safetensors, its tokenizer beside them),
* a Lightning `.ckpt` file (what `ModelCheckpoint` writes with one process or DDP),
* a sharded checkpoint folder (what FSDP2 writes: `torch.distributed.checkpoint`, a `.metadata` file).

A training checkpoint carries its model config and, since the task stores it (`tokenizer_state`), the
tokenizer's files as byte tensors, so `generate --checkpoint last.ckpt` needs nothing else. Everything is
read tensors-only (`weights_only=True`, safetensors). A tokenizer given by the user must be the one the
checkpoint was trained with (same fingerprint) and fit the model's vocabulary: decoding ids with another
vocabulary produces fluent-looking garbage, so a mismatch is refused before any work.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moxin_lightning.hf import CheckpointError, import_hf
from moxin_lightning.model.config import ModelConfig
from moxin_lightning.model.transformer import Transformer
from moxin_lightning.tokenizers import Tokenizer, load_tokenizer

TOKENIZER_KEY = "tokenizer"  # checkpoint entry: {"fingerprint": str, "files": {relative path: uint8 tensor}}
MODEL_CONFIG_KEY = "model_config"


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode, no gradients) and the tokenizer it was trained with."""

    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    source: Path


def load_model(
    path: str | Path,
    *,
    tokenizer: str | Path | Tokenizer | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """The model and tokenizer of a release / HF folder, a `.ckpt` file or a sharded checkpoint folder.

    tokenizer: a tokenizer (or its path) for a checkpoint that holds none; for one that does, it must be the same.
    dtype: cast the weights (default: as stored, fp32 for training checkpoints).
    """
    device = check_device(device)
    source = Path(path).expanduser()
    if not source.exists():
        raise CheckpointError(
            f"checkpoint {source} does not exist; pass a release or Hugging Face folder, a .ckpt file or a "
            "sharded checkpoint folder"
        )
    given = _open_tokenizer(tokenizer) if tokenizer is not None and not isinstance(tokenizer, Tokenizer) else tokenizer
    if (source / "config.json").is_file():
        model = import_hf(source, dtype=dtype)
        own = load_tokenizer(source) if _holds_tokenizer(source) else None
    else:
        weights, extras = read_training_checkpoint(source, extra_keys=(MODEL_CONFIG_KEY, TOKENIZER_KEY))
        if MODEL_CONFIG_KEY not in extras:
            raise CheckpointError(f"{source} records no model_config; it was not written by a moxin_lightning task")
        config = ModelConfig(**extras[MODEL_CONFIG_KEY])
        model = _model_from_weights(config, weights, dtype, source)
        own = tokenizer_from_state(extras[TOKENIZER_KEY]) if TOKENIZER_KEY in extras else None
    chosen = _choose_tokenizer(own, given, source)
    _check_vocabulary(chosen, model.config, source)
    model = model.to(device).eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=chosen, config=model.config, source=source)


# -- training checkpoints -------------------------------------------------------------------------------------


def read_training_checkpoint(
    source: Path, extra_keys: tuple[str, ...] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model weights in our names, the requested top-level entries that are present) of a `.ckpt` file or a
    sharded checkpoint folder (tensors in `torch.distributed.checkpoint` files, other entries in `meta.pt`)."""
    if source.is_dir() and (source / ".metadata").is_file():
        return _read_sharded(source, extra_keys)
    if source.is_file():
        return _read_file(source, extra_keys)
    raise CheckpointError(
        f"{source} is neither a Hugging Face/release folder (config.json), a sharded checkpoint folder (.metadata) "
        "nor a checkpoint file"
    )


def _read_file(file: Path, extra_keys: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - one line naming the file
        raise CheckpointError(f"cannot read {file} as a tensor-only checkpoint: {str(error).splitlines()[0]}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{file} is not a Lightning checkpoint (no state_dict); for HF weights give the folder")
    extras = {key: checkpoint[key] for key in extra_keys if key in checkpoint}
    return _strip_model_prefix(checkpoint["state_dict"], file), extras


def _read_sharded(folder: Path, extra_keys: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import warnings

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    wanted = ("state_dict",) + extra_keys
    keys = {
        name
        for name in FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        if name.split(".", 1)[0] in wanted
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        state = _load_state_dict_from_keys(keys, checkpoint_id=str(folder))
    flat = state.get("state_dict", {})
    flat = {name.removeprefix("state_dict."): value for name, value in flat.items()}
    extras = {key: state[key] for key in extra_keys if key in state}
    extras.update({key: value for key, value in _lightning_metadata(folder).items() if key in extra_keys})
    return _strip_model_prefix(flat, folder), extras


def _lightning_metadata(folder: Path) -> dict[str, Any]:
    """Lightning's sharded save puts every entry but the module and optimizer states in `meta.pt` (rank 0)."""
    file = folder / "meta.pt"
    if not file.is_file():
        return {}
    try:
        metadata = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - one line naming the file
        raise CheckpointError(f"cannot read {file} as a tensor-only checkpoint: {str(error).splitlines()[0]}") from None
    return metadata if isinstance(metadata, dict) else {}


def _strip_model_prefix(state: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    weights = {name.removeprefix("model."): value for name, value in state.items() if name.startswith("model.")}
    if not weights:
        raise CheckpointError(f"{where} holds no `model.*` weights; it was not written by a moxin_lightning task")
    return weights


def _model_from_weights(
    config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype | None, source: Path
) -> Transformer:
    from moxin_lightning.release.write import model_from_state_dict

    check_state(weights, config, source, "the checkpoint does not match its own model_config")
    if dtype is not None:
        weights = {name: tensor.to(dtype) for name, tensor in weights.items()}
    return model_from_state_dict(config, weights)


def check_state(state: dict[str, torch.Tensor], config: ModelConfig, where: Path, fix: str) -> None:
    """A one-line error (ending with `fix`) unless `state` holds exactly the tensors of a model built from
    `config`, with their shapes."""
    with torch.device("meta"):
        expected = {name: tuple(tensor.shape) for name, tensor in Transformer(config).state_dict().items()}
    for name, shape in expected.items():
        if name not in state:
            raise CheckpointError(f"{where} lacks {name!r}; {fix}")
        found = tuple(state[name].shape)
        if found != shape:
            raise CheckpointError(f"{where}: {name!r} has shape {found}, the model needs {shape}; {fix}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{where} has unexpected tensor {extra[0]!r}; {fix}")


# -- tokenizers -----------------------------------------------------------------------------------------------


def tokenizer_state(tokenizer: Tokenizer) -> dict[str, Any]:
    """The tokenizer's files as byte tensors (a checkpoint entry that `weights_only` loading accepts)."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save(folder)
        files = {
            file.relative_to(folder).as_posix(): torch.frombuffer(bytearray(file.read_bytes()), dtype=torch.uint8)
            for file in sorted(Path(folder).rglob("*"))
            if file.is_file()
        }
    return {"fingerprint": tokenizer.fingerprint, "files": files}


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    """The tokenizer a checkpoint carries, written once to the cache (its files must outlive this call)."""
    from moxin_lightning.atomic import written_as_a_whole
    from moxin_lightning.first_use import cache_root

    fingerprint = str(state["fingerprint"])
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:24]
    folder = cache_root() / "checkpoint-tokenizers" / digest
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with written_as_a_whole(folder) as staging:
            for name, data in state["files"].items():
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data.numpy().tobytes())
    tokenizer = load_tokenizer(folder)
    if tokenizer.fingerprint != fingerprint:
        raise CheckpointError(
            f"the tokenizer cached at {folder} does not match its checkpoint (fingerprint {tokenizer.fingerprint[:12]} "
            f"!= {fingerprint[:12]}); delete that folder and retry"
        )
    return tokenizer


def _holds_tokenizer(folder: Path) -> bool:
    from moxin_lightning.tokenizers.moe import LAYOUT_FILE

    return (folder / "tokenizer.model").is_file() or (folder / LAYOUT_FILE).is_file()


def _open_tokenizer(path: str | Path) -> Tokenizer:
    location = Path(path).expanduser()
    if not location.exists():
        raise CheckpointError(f"tokenizer {location} does not exist; pass a tokenizer.model file or its folder")
    return load_tokenizer(location)


def _choose_tokenizer(own: Tokenizer | None, given: Tokenizer | None, source: Path) -> Tokenizer:
    if own is None and given is None:
        raise CheckpointError(
            f"{source} holds no tokenizer; pass --tokenizer with the tokenizer.model (or folder) it was trained with"
        )
    if own is not None and given is not None and own.fingerprint != given.fingerprint:
        raise CheckpointError(
            f"the given tokenizer (fingerprint {given.fingerprint[:12]}) is not the one {source} was trained with "
            f"({own.fingerprint[:12]}); drop --tokenizer to use the checkpoint's own"
        )
    return own if own is not None else given


def _check_vocabulary(tokenizer: Tokenizer, config: ModelConfig, source: Path) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but {source} has a vocabulary of {config.vocab_size}; "
            "pass the tokenizer the model was trained with"
        )


def check_device(device: str | torch.device) -> torch.device:
    """`--device` as a torch device that exists here: a one-line error, before any weights are read, instead of
    torch's "Torch not compiled with CUDA enabled" assertion (or a driver error) deep in `.to(device)`."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device; write e.g. cpu, cuda or cuda:1") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: no CUDA GPU is visible to this process; use --device cpu")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    return resolved
