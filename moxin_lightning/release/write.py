"""`write_release`: a model and its `Release` contents as one folder, built beside the destination and renamed
into place, so a crash leaves the previous release untouched.

Also the checks that must run before any work (`check_destination`) and `model_from_state_dict`, which lets a
caller holding only a state dict (e.g. the promotion callback, or a dtype conversion) write a release.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from moxin_lightning.atomic import written_as_a_whole
from moxin_lightning.hf import DEFAULT_MAX_SHARD_BYTES, export_hf
from moxin_lightning.model.config import ModelConfig
from moxin_lightning.model.transformer import Transformer
from moxin_lightning.release.card import data_card, model_card
from moxin_lightning.release.contents import Release
from moxin_lightning.release.mof import MOF_FILE, mof_evidence, mof_manifest
from moxin_lightning.release.plots import check_panels, check_smoothing, curves_document, plot_curves
from moxin_lightning.release.provenance import code_version, copy_code
from moxin_lightning.release.samples import sample_outputs

WeightDtype = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_from_state_dict(config: ModelConfig, state_dict: Mapping[str, torch.Tensor]) -> Transformer:
    """A Transformer holding exactly these tensors (no copy, no initialisation): a full state dict in our names."""
    with torch.device("meta"):
        model = Transformer(config)
    state = dict(state_dict)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_embeddings else set())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        what = f"lacks {missing[0]!r}" if missing else f"has unexpected tensor {unexpected[0]!r}"
        raise ValueError(f"the state dict {what} for a {config.n_layers}-layer model; pass the full model state")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model


def is_release(folder: str | os.PathLike) -> bool:
    """Whether `folder` was written by `write_release` (only such a folder may be replaced)."""
    return (Path(folder) / MOF_FILE).is_file() and (Path(folder) / "config.json").is_file()


def check_destination(output: str | os.PathLike, overwrite: bool) -> None:
    """Refuse, before any work, a destination that is a file, a folder of something else, or a release that
    must not be replaced."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"release folder {output} is a file; choose a folder path")
    if output.is_dir() and any(output.iterdir()):
        if not is_release(output):
            raise ValueError(f"{output} exists and is not a release (no {MOF_FILE}); choose a new or empty folder")
        if not overwrite:
            raise ValueError(f"{output} already holds a release; pass overwrite=True or choose another folder")


def write_release(
    output: str | os.PathLike,
    model: Transformer,
    release: Release,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: WeightDtype | None = None,
) -> Path:
    """Write `model` and `release` as one folder, atomically; returns the folder.

    dtype: store the weights as "float32", "bfloat16" or "float16" (default: as they are).
    """
    output = Path(output)
    check_destination(output, overwrite)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    if release.sample_prompts and release.tokenizer is None:
        raise ValueError("sample prompts need a tokenizer; pass Release(tokenizer=...) or no sample_prompts")
    if release.technical_report is not None and not Path(release.technical_report).is_file():
        raise FileNotFoundError(f"technical report {release.technical_report} not found; pass an existing file")
    check_panels(release.panels)
    check_smoothing(release.smoothing)
    if dtype is not None:  # a converted copy: the caller's model stays as it is
        state = {name: tensor.to(DTYPES[dtype]) for name, tensor in model.state_dict().items()}
        model = model_from_state_dict(model.config, state)
    with written_as_a_whole(output) as staging:
        _write_hf(model, release.tokenizer, staging, max_shard_bytes)
        _write_contents(model, release, staging, output)
    return output


def _write_hf(model: Transformer, tokenizer: Any, staging: Path, max_shard_bytes: int) -> None:
    """`export_hf` into a sub-folder, then its files up to the release root (so the root is a HF folder)."""
    hf_folder = export_hf(model, staging / "_hf", tokenizer, max_shard_bytes=max_shard_bytes)
    for item in hf_folder.iterdir():
        item.rename(staging / item.name)
    hf_folder.rmdir()


def _write_contents(model: Transformer, release: Release, staging: Path, output: Path) -> None:
    if release.run_config is not None:
        (staging / "config.yaml").write_text(_as_yaml(release.run_config), encoding="utf-8")
    for name, manifest in release.data_manifests.items():
        (staging / "data" / name).mkdir(parents=True)
        _write_json(staging / "data" / name / "manifest.json", manifest)
    if release.data_manifests:
        (staging / "data" / "README.md").write_text(data_card(release.data_manifests), encoding="utf-8")
    _write_json(staging / "metrics.json", {"metrics": release.metrics, "training": release.training})
    _write_json(staging / "loss_curves.json", curves_document(release.curves, release.panels, release.smoothing))
    plot_curves(release.curves, release.panels, release.smoothing, staging, title=release.name)
    if release.sample_prompts:
        _write_json(staging / "samples.json", {"samples": sample_outputs(model, release)})
    if release.include_code:
        copy_code(staging / "code")
    if release.technical_report is not None:
        report = Path(release.technical_report)
        shutil.copyfile(report, staging / f"technical_report{report.suffix}")
    version = code_version()
    _write_json(staging / "version.json", version)
    mof = mof_manifest(mof_evidence(staging, release))
    _write_json(staging / MOF_FILE, mof)
    card = model_card(model.config, release, mof, version, output)
    (staging / "README.md").write_text(card, encoding="utf-8")


def _write_json(file: Path, data: Any) -> None:
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _as_yaml(config: str | Mapping[str, Any]) -> str:
    if isinstance(config, str):
        return config if config.endswith("\n") else config + "\n"
    import yaml

    return yaml.safe_dump(_plain(config), sort_keys=False)


def _plain(value: Any) -> Any:
    """YAML-safe data: dataclasses as dicts, paths as strings, tensors as lists, anything else by repr."""
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
