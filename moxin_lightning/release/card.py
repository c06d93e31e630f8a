"""The human-readable parts of a release: the model card (README.md) and the data card.

Everything here turns facts already gathered (config, metrics, manifests, mof.json, version.json, the recorded
curves) into text; it decides nothing. The pictures the card shows are drawn by `moxin_lightning.release.plots`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from moxin_lightning.model.config import ModelConfig
from moxin_lightning.release.contents import Release
from moxin_lightning.release.mof import MOF_COMPONENTS
from moxin_lightning.release.plots import drawn_panels, final_values


def format_value(value: Any) -> str:
    """How numbers appear in the cards: integers as they are, floats to 6 significant digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def _table(header: tuple[str, ...], rows: Iterable[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(format_value(cell) for cell in row) + " |" for row in rows]
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
    curves = _curves_section(release)
    if curves:
        parts.append(curves)
    if release.sample_prompts:
        parts.append("## Sample outputs\n\nGreedy continuations, in `samples.json`.")
    parts.append(_how_to_load(output))
    parts.append(_mof_section(mof))
    parts.append(_provenance(version))
    return "\n\n".join(parts) + "\n"


def _curves_section(release: Release) -> str:
    """One picture per panel, each with its metrics' final values; empty when nothing was recorded."""
    panels = drawn_panels(release.curves, release.panels)
    if not panels:
        return ""
    beta = release.smoothing
    training = (
        f"drawn faint under their debiased exponential moving average (beta = {format_value(beta)}; the formula and "
        "the smoothed points are in the file)"
        if beta
        else "drawn as logged"
    )
    pictures = ", ".join(f"`{panel.name}.png`" for panel in panels)
    parts = [
        f"## Training curves\n\nOne picture per panel ({pictures}), drawn from `loss_curves.json`. Training metrics "
        f"are recorded after every optimizer step and {training}; validation metrics (`val/...`) at every "
        "validation, the first at step 0 (the starting weights, before any update) when the run validated before "
        "training. The tables give each metric's last point."
    ]
    header = ("metric", "step", "final value", "final EMA")[: 4 if beta else 3]
    for panel in panels:
        rows = [_final_row(row, beta) for row in final_values(release.curves, panel, beta)]
        parts.append(f"### {panel.label}\n\n![{panel.label}]({panel.name}.png)\n\n{_table(header, rows)}")
    return "\n\n".join(parts)


def _final_row(row: Mapping[str, Any], beta: float) -> tuple[Any, ...]:
    """metric, step, last value and, when smoothing, the last EMA value (blank for a validation metric)."""
    cells = (row["metric"], row["step"], row["value"])
    return (*cells, "" if row["smoothed"] is None else row["smoothed"]) if beta else cells


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
        "## How to load\n\nWith Hugging Face transformers (`pip install transformers`; moxin_lightning's `dev` extra "
        "has it):\n\n```python\n"
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
