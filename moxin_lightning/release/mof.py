"""mof.json: the release measured against the Model Openness Framework (White et al., arXiv:2403.13784).

Each of the framework's components is marked included or not from what the written folder actually holds
(`mof_evidence`), and the highest class whose required components are all there is named, with what the next
class still needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from moxin_lightning.release.contents import Release

MOF_FILE = "mof.json"

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


def mof_evidence(staging: Path, release: Release) -> dict[str, tuple[str | None, str]]:
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
            present("code/moxin_lightning/decoding.py"),
            "moxin_lightning.decoding (the engine behind moxin_lightning.generate); transformers also loads the folder"
            if code
            else no_code,
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
