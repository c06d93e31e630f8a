"""Release folders: a trained model as one self-describing Hugging Face folder.

A release is what a phase hands on (the next phase's `init_from` points at it) and what gets published, so it
carries everything needed to judge and reproduce it, not only the weights:

    config.json, model*.safetensors, generation_config.json   Hugging Face Mistral weights (`hf.export_hf`)
    tokenizer.model, tokenizer_config.json                   the tokenizer, when there is one
    config.yaml                                              the resolved run configuration
    data/<i>-<name>/manifest.json, data/README.md            each dataset's manifest, and a data card made from them
    metrics.json, loss_curves.json, loss.png                 final metrics, the recorded loss curves and their plot
    samples.json                                             greedy continuations of given prompts (when asked)
    code/                                                    the source of moxin_lightning, callbacks, datamodules
    version.json                                             package, git commit, library versions
    mof.json                                                 Model Openness Framework components and class
    README.md                                                the model card

The folder is built beside its destination and renamed into place (`moxin_lightning.atomic`), so a crash
leaves the previous release untouched. Nothing here imports Lightning: the `CheckpointPromotion` callback
and a stand-alone export both call `write_release`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch

import moxin_lightning
from moxin_lightning.atomic import written_as_a_whole
from moxin_lightning.hf import DEFAULT_MAX_SHARD_BYTES, export_hf
from moxin_lightning.model.config import ModelConfig
from moxin_lightning.model.transformer import Transformer

MOF_FILE = "mof.json"
WeightDtype = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CODE_PACKAGES = ("moxin_lightning", "callbacks", "datamodules")


# ----------------------------------------------------------------------------------------------
# what goes in


@dataclass
class LossCurves:
    """(step, loss) points of the training and validation loss, in step order.

    A point at or before the last recorded step replaces everything from that step on: a run resumed from an
    older checkpoint replays those steps, and the curve must show the replay, not both."""

    train: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)

    def add_train(self, step: int, loss: float) -> None:
        _add_point(self.train, step, loss)

    def add_val(self, step: int, loss: float) -> None:
        _add_point(self.val, step, loss)

    def to_dict(self) -> dict[str, list[list[float]]]:
        return {"train": [[s, v] for s, v in self.train], "val": [[s, v] for s, v in self.val]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LossCurves:
        return cls(
            train=[(int(s), float(v)) for s, v in data.get("train", [])],
            val=[(int(s), float(v)) for s, v in data.get("val", [])],
        )


def _add_point(points: list[tuple[int, float]], step: int, value: float) -> None:
    while points and points[-1][0] >= step:
        points.pop()
    points.append((int(step), float(value)))


@dataclass
class Release:
    """Everything in a release besides the weights; each part is optional and left out when empty.

    run_config: the resolved configuration as YAML text, or a mapping (written as YAML).
    data_manifests: folder name under data/ -> a prepared dataset's manifest.
    metrics: final metric name -> value.
    training: facts about the run for the card (global_step, tokens_seen, seq_len, batch_size, ...).
    sample_prompts: prompts whose greedy continuations (`sample_tokens` new tokens) go into samples.json;
        they need a tokenizer.
    include_code: copy the source of moxin_lightning, callbacks and datamodules into code/.
    technical_report: a file copied into the release as the technical report.
    """

    name: str = "moxin_lightning model"
    description: str = ""
    tokenizer: Any = None
    run_config: str | Mapping[str, Any] | None = None
    data_manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    curves: LossCurves = field(default_factory=LossCurves)
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 32
    include_code: bool = True
    technical_report: str | None = None


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


# ----------------------------------------------------------------------------------------------
# writing


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
    _write_json(staging / "loss_curves.json", release.curves.to_dict())
    if release.curves.train or release.curves.val:
        plot_losses(release.curves, staging / "loss.png", title=release.name)
    if release.sample_prompts:
        _write_json(staging / "samples.json", {"samples": sample_outputs(model, release)})
    if release.include_code:
        copy_code(staging / "code")
    if release.technical_report is not None:
        report = Path(release.technical_report)
        shutil.copyfile(report, staging / f"technical_report{report.suffix}")
    version = code_version()
    _write_json(staging / "version.json", version)
    mof = mof_manifest(_mof_evidence(staging, release))
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


def copy_code(destination: Path) -> list[str]:
    """Copy the Python source of this project's packages (and its pyproject.toml and conf/ when run from a
    checkout) to `destination`; returns the packages copied. Only packages installed beside moxin_lightning
    count, so an unrelated package that happens to be called `callbacks` is never copied."""
    root = _project_root()
    copied = []
    for name in CODE_PACKAGES:
        spec = importlib.util.find_spec(name)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations or Path(locations[0]).resolve().parent != root:
            continue
        source = Path(locations[0])
        for file in sorted(source.rglob("*.py")):
            if "__pycache__" in file.parts:
                continue
            target = destination / name / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
        copied.append(name)
    if (root / "pyproject.toml").is_file():
        shutil.copyfile(root / "pyproject.toml", destination / "pyproject.toml")
        if (root / "conf").is_dir():
            shutil.copytree(root / "conf", destination / "conf", ignore=shutil.ignore_patterns(".*"))
    return copied


def _project_root() -> Path:
    return Path(moxin_lightning.__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# provenance


def code_version() -> dict[str, Any]:
    """The code that made the release: package version, git commit (None outside a checkout) and libraries."""
    libraries = ("torch", "lightning", "litdata", "safetensors", "sentencepiece")
    return {
        "moxin_lightning": moxin_lightning.__version__,
        "git": git_state(_project_root()),
        "python": platform.python_version(),
        **{name: _installed_version(name) for name in libraries},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def git_state(root: Path) -> dict[str, Any] | None:
    """{"commit", "dirty"} when `root` is the top of a git checkout; None otherwise or without git.

    `dirty` counts changes to tracked files only: the release's code/ folder holds the exact source anyway."""
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root.resolve():
        return None
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _git(root: Path, *args: str) -> str | None:
    # GIT_OPTIONAL_LOCKS=0: `git status` must not take the index lock while someone commits in that checkout.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        result = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------------------
# Model Openness Framework (White et al., arXiv:2403.13784)

MOF_COMPONENTS = {
    "model_architecture": "Model architecture",
    "data_preprocessing_code": "Data preprocessing code",
    "training_code": "Training code",
    "inference_code": "Inference code",
    "evaluation_code": "Evaluation code",
    "supporting_libraries_and_tools": "Supporting libraries and tools",
    "final_parameters": "Model parameters (final)",
    "intermediate_parameters": "Model parameters (intermediate)",
    "datasets": "Datasets",
    "evaluation_data": "Evaluation data",
    "model_metadata": "Model metadata",
    "sample_outputs": "Sample model outputs",
    "model_card": "Model card",
    "data_card": "Data card",
    "technical_report": "Technical report",
    "research_paper": "Research paper",
    "evaluation_results": "Evaluation results",
}
# Each class requires the components of the class below it; a tuple means any one of them. Optional
# components (sample outputs for Class III, model metadata for Class I) are not required.
_CLASS_III = ("model_architecture", "final_parameters", ("technical_report", "research_paper"), "evaluation_results")
_CLASS_III += ("model_card", "data_card")
_CLASS_II = _CLASS_III + ("training_code", "inference_code", "evaluation_code", "evaluation_data")
_CLASS_II += ("supporting_libraries_and_tools",)
_CLASS_I = _CLASS_II + ("research_paper", "datasets", "data_preprocessing_code", "intermediate_parameters")
MOF_CLASSES = {3: ("Class III - Open Model", _CLASS_III), 2: ("Class II - Open Tooling", _CLASS_II)}
MOF_CLASSES[1] = ("Class I - Open Science", _CLASS_I)
LICENSE_NOTE = (
    "No licences are recorded here, and every MOF class also requires each component under an open licence "
    "(OSI-approved for code, open data/content licences otherwise): add them before publishing"
)


def missing_for_class(included: Iterable[str], level: int) -> list[str]:
    """The components (or "a or b" alternatives) a release still lacks for MOF class `level` (1, 2 or 3)."""
    have = set(included)
    missing = []
    for need in MOF_CLASSES[level][1]:
        options = need if isinstance(need, tuple) else (need,)
        if not have.intersection(options):
            missing.append(" or ".join(options))
    return missing


def mof_class(included: Iterable[str]) -> int | None:
    """The highest MOF class (1 is the highest) whose required components are all included; None below III."""
    have = set(included)
    reached = [level for level in MOF_CLASSES if not missing_for_class(have, level)]
    return min(reached) if reached else None


def mof_manifest(evidence: Mapping[str, tuple[str | None, str]]) -> dict[str, Any]:
    """mof.json: each component with `included`, its `path` in the release and a note; the class reached.

    evidence: component id -> (path in the release or None when not included, note)."""
    unknown = sorted(set(evidence) - set(MOF_COMPONENTS))
    if unknown:
        raise ValueError(f"unknown MOF component {unknown[0]!r}; use one of: {', '.join(MOF_COMPONENTS)}")
    components = []
    for component, name in MOF_COMPONENTS.items():
        path, note = evidence.get(component, (None, "not part of this release"))
        components.append({"id": component, "name": name, "included": path is not None, "path": path, "note": note})
    included = [c["id"] for c in components if c["included"]]
    level = mof_class(included)
    next_level = 3 if level is None else level - 1
    return {
        "framework": "Model Openness Framework (MOF), arXiv:2403.13784",
        "class": level,
        "class_name": MOF_CLASSES[level][0] if level else None,
        "next_class": None
        if next_level < 1
        else {
            "class": next_level,
            "name": MOF_CLASSES[next_level][0],
            "missing": missing_for_class(included, next_level),
        },
        "licenses": LICENSE_NOTE,
        "components": components,
    }


def _mof_evidence(staging: Path, release: Release) -> dict[str, tuple[str | None, str]]:
    """What the written folder actually holds, component by component (read from the files, not assumed)."""

    def present(path: str) -> str | None:
        return path if (staging / path).exists() else None

    code = present("code/moxin_lightning")
    no_code = "not bundled (include_code is off)"
    weights = present("model.safetensors") or present("model.safetensors.index.json")
    data = "referenced by the manifests in data/ (sources, sizes, sha256), not included"
    report = next((p.name for p in staging.glob("technical_report.*")), None)
    return {
        "model_architecture": (
            present("code/moxin_lightning/model"),
            "moxin_lightning.model; config.json gives its hyperparameters, and transformers' MistralForCausalLM "
            "runs the same architecture" + ("" if code else f"; the code is {no_code}"),
        ),
        "data_preprocessing_code": (
            present("code/moxin_lightning/data"),
            "`prepare` and the tokenizers (moxin_lightning.data, moxin_lightning.tokenizers)" if code else no_code,
        ),
        "training_code": (
            code and "code/",
            "tasks, callbacks and datamodules; config.yaml is the run's configuration" if code else no_code,
        ),
        "inference_code": (
            present("code/moxin_lightning/generate.py"),
            "moxin_lightning.generate; transformers also loads the folder" if code else no_code,
        ),
        "evaluation_code": (None, "none beyond the validation loss, which the training code computes"),
        "supporting_libraries_and_tools": (
            code and "code/",
            "the moxin_lightning library; third-party libraries are named in version.json, not bundled"
            if code
            else no_code,
        ),
        "final_parameters": (weights, "safetensors, Hugging Face Mistral layout"),
        "intermediate_parameters": (None, "training checkpoints are not part of a release"),
        "datasets": (None, data if release.data_manifests else "no dataset manifests were given"),
        "evaluation_data": (None, "the datasets' held-out splits, " + data if release.data_manifests else "none"),
        "model_metadata": (
            present("config.json"),
            "config.json, generation_config.json, version.json" + (", config.yaml" if release.run_config else ""),
        ),
        "sample_outputs": (present("samples.json"), "greedy continuations of the given prompts"),
        "model_card": ("README.md", "written by moxin_lightning.release"),
        "data_card": (
            present("data/README.md"),
            "generated from the manifests: sources, sizes, splits and tokenizer; no content, licence or bias analysis",
        ),
        "technical_report": (report, "copied from the given file" if report else "none given"),
        "research_paper": (None, "none"),
        "evaluation_results": (
            "metrics.json" if release.metrics else None,
            "final training and validation metrics (validation loss on the held-out split); no benchmark results",
        ),
    }


# ----------------------------------------------------------------------------------------------
# model card, data card, plot


def format_value(value: Any) -> str:
    """How numbers appear in the cards: integers as they are, floats to 6 significant digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def _table(header: tuple[str, str], rows: Iterable[tuple[Any, Any]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {key} | {format_value(value)} |" for key, value in rows]
    return "\n".join(lines)


def model_card(
    config: ModelConfig, release: Release, mof: Mapping[str, Any], version: Mapping[str, Any], output: Path
) -> str:
    """README.md: what the model is, how it was trained, how well, how to load it and how open it is."""
    description = release.description or (
        "A Mistral-architecture causal language model (the Moxin-7B recipe) trained with moxin_lightning."
    )
    architecture = [*config.to_dict().items(), ("parameters", config.num_params())]
    parts = [
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags: [moxin, mistral, moxin_lightning]\n---",
        f"# {release.name}\n\n{description}",
        "## Architecture\n\n" + _table(("field", "value"), architecture),
    ]
    if release.training:
        parts.append("## Training\n\n" + _table(("run", "value"), release.training.items()) + _data_list(release))
    if release.metrics:
        parts.append("## Metrics\n\n" + _table(("metric", "value"), sorted(release.metrics.items())))
    if release.curves.train or release.curves.val:
        parts.append(
            "## Loss curves\n\n![training and validation loss](loss.png)\n\n"
            "The points are in `loss_curves.json` (train: every optimizer step; validation: every validation run)."
        )
    if release.sample_prompts:
        parts.append("## Sample outputs\n\nGreedy continuations, in `samples.json`.")
    parts.append(_how_to_load(output))
    parts.append(_mof_section(mof))
    parts.append(_provenance(version))
    return "\n\n".join(parts) + "\n"


def _data_list(release: Release) -> str:
    if not release.data_manifests:
        return ""
    lines = ["\n\nData (manifests in `data/`, data card in `data/README.md`):\n"]
    for name, manifest in release.data_manifests.items():
        tokens = manifest.get("tokens")
        lines.append(f"- `{name}`: {format_value(tokens)} tokens, fingerprint `{manifest.get('fingerprint', '?')}`")
    return "\n".join(lines)


def _how_to_load(output: Path) -> str:
    return (
        "## How to load\n\nWith Hugging Face transformers:\n\n```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{output}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{output}")  # when the release holds tokenizer.model\n```\n\n'
        "With moxin_lightning (`moxin_lightning.hf.import_hf`):\n\n```python\n"
        f'from moxin_lightning.hf import import_hf\n\nmodel = import_hf("{output}")\n```\n\n'
        f"To start the next phase from it, set the task's `init_from: {output}` in its YAML config."
    )


def _mof_section(mof: Mapping[str, Any]) -> str:
    reached = mof["class_name"] or "none (below Class III)"
    text = f"## Openness (Model Openness Framework)\n\nClass reached by this folder alone: **{reached}**."
    if mof["next_class"]:
        missing = [" or ".join(MOF_COMPONENTS[c] for c in need.split(" or ")) for need in mof["next_class"]["missing"]]
        text += f" Missing for {mof['next_class']['name']}: {', '.join(missing)}."
    text += f" {mof['licenses']}. Details in `mof.json`.\n\n"
    rows = ["| component | included | where / note |", "| --- | --- | --- |"]
    for c in mof["components"]:
        where = f"`{c['path']}`: {c['note']}" if c["included"] else c["note"]
        rows.append(f"| {c['name']} | {'yes' if c['included'] else 'no'} | {where} |")
    return text + "\n".join(rows)


def _provenance(version: Mapping[str, Any]) -> str:
    git = version.get("git")
    commit = f"{git['commit']}{' (with uncommitted changes)' if git.get('dirty') else ''}" if git else "unknown"
    return (
        f"## Provenance\n\nmoxin_lightning {version['moxin_lightning']}, commit {commit}; "
        f"torch {version.get('torch')}, lightning {version.get('lightning')} (all versions in `version.json`)."
    )


def data_card(manifests: Mapping[str, Mapping[str, Any]]) -> str:
    """data/README.md from the manifests: what each dataset is made of, how it was split and tokenized."""
    parts = [
        "# Data card\n\nGenerated from the prepared datasets' manifests (`<name>/manifest.json`). The data itself is "
        "not part of the release; the fingerprints and sha256 sums identify it exactly."
    ]
    for name, manifest in manifests.items():
        tokenizer = manifest.get("tokenizer", {})
        split = manifest.get("split", {})
        lines = [
            f"## {name}",
            "",
            f"- fingerprint `{manifest.get('fingerprint', '?')}`; {format_value(manifest.get('documents', '?'))} "
            f"documents, {format_value(manifest.get('tokens', '?'))} tokens",
            f"- tokenizer: {format_value(tokenizer.get('vocab_size', '?'))} pieces, fingerprint "
            f"`{tokenizer.get('fingerprint', '?')}`",
            f"- held-out split: fraction {split.get('val_fraction', '?')}, seed {split.get('seed', '?')}",
            "",
            "| split | documents | tokens | sha256 |",
            "| --- | --- | --- | --- |",
        ]
        for split_name, entry in manifest.get("splits", {}).items():
            lines.append(
                f"| {split_name} | {format_value(entry.get('documents', '?'))} | "
                f"{format_value(entry.get('tokens', '?'))} | `{entry.get('sha256', '?')}` |"
            )
        if manifest.get("sources"):
            lines += ["", "| source | documents | bytes | sha256 |", "| --- | --- | --- | --- |"]
            for source in manifest["sources"]:
                lines.append(
                    f"| `{source.get('input', '?')}` | {format_value(source.get('documents', '?'))} | "
                    f"{format_value(source.get('bytes', '?'))} | `{source.get('sha256', '?')}` |"
                )
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def plot_losses(curves: LossCurves, file: Path, title: str = "") -> None:
    """loss.png: training loss per optimizer step and validation loss per validation run, against the step.

    Drawn on a bare `Figure` (Agg canvas): no pyplot, so no global backend or figure state is touched."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 4), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    if curves.train:
        steps, losses = zip(*curves.train, strict=True)
        axes.plot(steps, losses, linewidth=1, alpha=0.8, label="train")
    if curves.val:
        steps, losses = zip(*curves.val, strict=True)
        axes.plot(steps, losses, marker="o", markersize=4, label="validation")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(file, format="png")
