"""Release folders: a trained model as one self-describing Hugging Face folder.

A release is what a phase hands on (the next phase's `init_from` points at it) and what gets published, so it
carries everything needed to judge and reproduce it, not only the weights:

    config.json, model*.safetensors, generation_config.json   Hugging Face Mistral weights (`hf.export_hf`)
    tokenizer.model, tokenizer_config.json                   the tokenizer, when there is one
    config.yaml                                              the resolved run configuration
    data/<i>-<name>/manifest.json, data/README.md            each dataset's manifest, and a data card made from them
    metrics.json, loss_curves.json                           final metrics; the recorded curves, smoothed, and panels
    loss.png, <panel>.png                                    one picture per panel the task declares (loss.png;
                                                             DPO adds reward_accuracy.png, reward_margin.png; GRPO
                                                             reward_mean.png, completion_length.png,
                                                             truncation_rate.png)
    samples.json                                             greedy continuations of given prompts (when asked)
    code/                                                    the source of moxin_lightning, callbacks, datamodules
    version.json                                             package, git commit, library versions
    mof.json                                                 Model Openness Framework components and class
    README.md                                                the model card

The folder is built beside its destination and renamed into place (`moxin_lightning.atomic`), so a crash
leaves the previous release untouched. Nothing here imports Lightning: the `CheckpointPromotion` callback
and a stand-alone export both call `write_release`.

The modules, each with one job (imports run one way, top to bottom):

    contents     `Release`, `LossCurves` and `Panel`: what goes in besides the weights, and what is drawn
    plots        loss_curves.json and the panels' PNGs: the smoothing (a debiased EMA) and the pictures
    provenance   code/ and version.json: the bundled source, git commit and library versions
    samples      samples.json: greedy continuations of the given prompts
    mof          mof.json: Model Openness Framework components and the class reached
    card         README.md and data/README.md
    write        `write_release` and the checks before it; assembles all of the above atomically
"""

from moxin_lightning.release.card import data_card, format_value, model_card
from moxin_lightning.release.contents import LossCurves, Panel, Release
from moxin_lightning.release.mof import (
    LICENSE_NOTE,
    MOF_CLASSES,
    MOF_COMPONENTS,
    MOF_FILE,
    missing_for_class,
    mof_class,
    mof_evidence,
    mof_manifest,
)
from moxin_lightning.release.plots import (
    EMA_FORMULA,
    curves_document,
    default_panels,
    drawn_panels,
    ema,
    final_values,
    panel_figure,
    plot_curves,
)
from moxin_lightning.release.provenance import CODE_PACKAGES, code_version, copy_code, git_state
from moxin_lightning.release.samples import sample_outputs
from moxin_lightning.release.write import (
    DTYPES,
    WeightDtype,
    check_destination,
    is_release,
    model_from_state_dict,
    write_release,
)

__all__ = [
    "CODE_PACKAGES",
    "DTYPES",
    "EMA_FORMULA",
    "LICENSE_NOTE",
    "MOF_CLASSES",
    "MOF_COMPONENTS",
    "MOF_FILE",
    "LossCurves",
    "Panel",
    "Release",
    "WeightDtype",
    "check_destination",
    "code_version",
    "copy_code",
    "curves_document",
    "data_card",
    "default_panels",
    "drawn_panels",
    "ema",
    "final_values",
    "format_value",
    "git_state",
    "is_release",
    "missing_for_class",
    "model_card",
    "model_from_state_dict",
    "mof_class",
    "mof_evidence",
    "mof_manifest",
    "panel_figure",
    "plot_curves",
    "sample_outputs",
    "write_release",
]
