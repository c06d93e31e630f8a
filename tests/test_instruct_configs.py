"""Moxin-Instruct's configs: `conf/sft.yaml` and `conf/dpo.yaml`, their CPU overlays, and the chain they form.

What must hold: the full configs carry Moxin-Instruct's published settings (open-instruct's Tülu 3 8B SFT and
length-normalised DPO, as Moxin ran them) and mark them [Moxin]; the local overlays turn them into CPU runs on
the built-in chat data and pairs while the rest stays; each stage's `init_from` is the release the previous stage
writes. The slow test runs the chain on a CPU: pretraining, SFT from its release, DPO from SFT's release.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from moxin_lightning.datamodules.chat import ChatData
from moxin_lightning.datamodules.preference import PreferenceData
from moxin_lightning.hf import import_hf
from moxin_lightning.model.transformer import same_weights
from moxin_lightning.tasks.dpo import DPO
from moxin_lightning.tokenizers import SentencePieceTokenizer, TuluTemplate
from tests.prepared_data import FitChain
from tests.test_cli import (  # noqa: F401  (command_line: the autouse fixture that keeps pytest's argv from LightningCLI)
    LOCAL,
    PHASES,
    ROOT,
    callback,
    column,
    command_line,
    configs,
    csv_rows,
    curves,
    printed_config,
)

SFT, SFT_LOCAL = ROOT / "conf" / "sft.yaml", ROOT / "conf" / "sft-local.yaml"
DPO_CONF, DPO_LOCAL = ROOT / "conf" / "dpo.yaml", ROOT / "conf" / "dpo-local.yaml"
CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"
PROMOTION = "moxin_lightning.callbacks.CheckpointPromotion"
LOCAL_OVERRIDES = {"attention": "sdpa", "vocab_size": 4096, "sliding_window": 512}


@functools.cache
def printed(*files: Path) -> dict:
    """`--print_config` of `fit` with these files, parsed once per module (each parse takes ~2 s)."""
    return printed_config(*configs(*files))


def per_step(config: dict) -> int:
    """Sequences (SFT) or pairs (DPO) per optimizer step, over every process."""
    data, trainer = config["data"]["init_args"], config["trainer"]
    return data["batch_size"] * trainer["accumulate_grad_batches"] * trainer["devices"] * trainer["num_nodes"]


def setting_lines(file: Path) -> dict[str, str]:
    """Each `key: value` line of a config by its key (test_cli's phase check reads the lines the same way)."""
    return {line.split(":")[0].strip(): line for line in file.read_text().splitlines() if ":" in line}


# -- the full configs -------------------------------------------------------------------------------------


def test_sft_is_moxin_instructs_tulu3_sft_from_the_base_model():
    config = printed(SFT)
    model, data, trainer = config["model"]["init_args"], config["data"]["init_args"], config["trainer"]
    assert config["seed_everything"] == 123
    assert config["model"]["class_path"] == "moxin_lightning.tasks.SFT"
    assert model["preset"] == "moxin-7b"
    assert model["init_from"] == "runs/phase3/release"  # Moxin-7B-Enhanced, the base model
    assert model["loss_reduction"] == "sum"
    assert (model["lr"], model["schedule"], model["warmup_ratio"]) == (5e-6, "linear", 0.03)
    assert (model["min_lr_ratio"], model["weight_decay"], model["betas"]) == (0.0, 0.0, [0.9, 0.999])
    assert config["data"]["class_path"] == "moxin_lightning.datamodules.ChatData"
    assert data["template"]["class_path"] == "moxin_lightning.tokenizers.TuluTemplate"
    assert data["max_length"] == 4096
    assert (data["train"], data["pack"]) == (["data/tulu-3-sft-mixture"], False)  # a prepared folder, unpacked
    # the tokenizer comes with the base model: `${model.init_args.init_from}` resolved
    assert data["tokenizer"]["class_path"] == "moxin_lightning.tokenizers.SentencePieceTokenizer"
    assert data["tokenizer"]["init_args"]["path"] == "runs/phase3/release/tokenizer.model"
    assert (trainer["max_epochs"], trainer["max_steps"]) == (2, -1)  # epochs, not steps
    layout = (trainer["devices"], trainer["num_nodes"], data["batch_size"], trainer["accumulate_grad_batches"])
    assert layout == (8, 8, 1, 2)
    assert per_step(config) == 64 * 1 * 2 == 128
    assert trainer["precision"] == "bf16-mixed"
    checkpoint = callback(config, CHECKPOINT)
    assert (checkpoint["every_n_epochs"], checkpoint["every_n_train_steps"]) == (1, None)  # a checkpoint each epoch
    assert (checkpoint["save_top_k"], checkpoint["save_last"]) == (-1, True)
    assert checkpoint["dirpath"] == "runs/sft/checkpoints"
    assert callback(config, PROMOTION)["dirpath"] == "runs/sft/release"
    assert callback(config, PROMOTION)["name"] == "moxin-7b-sft"


def test_dpo_is_moxin_instructs_length_normalised_dpo_from_the_sft_release():
    sft, config = printed(SFT), printed(DPO_CONF)
    model, data, trainer = config["model"]["init_args"], config["data"]["init_args"], config["trainer"]
    assert config["model"]["class_path"] == "moxin_lightning.tasks.DPO"
    assert model["init_from"] == "runs/sft/release" == callback(sft, PROMOTION)["dirpath"]
    assert (model["loss_type"], model["beta"], model["reference"]) == ("dpo_norm", 5.0, "cache")
    assert (model["lr"], model["schedule"], model["warmup_ratio"]) == (5e-7, "linear", 0.1)
    assert (model["min_lr_ratio"], model["weight_decay"], model["betas"]) == (0.0, 0.0, [0.9, 0.999])
    assert model["activation_checkpointing"] is True
    assert config["data"]["class_path"] == "moxin_lightning.datamodules.PreferenceData"
    assert data["truncation"] == "right"  # each whole sequence from the right, as open-instruct's dpo_tune.py
    assert data["template"]["class_path"] == "moxin_lightning.tokenizers.TuluTemplate"
    assert data["max_length"] == 2048
    assert data["tokenizer"]["init_args"]["path"] == "runs/sft/release/tokenizer.model"
    assert (trainer["max_epochs"], trainer["max_steps"]) == (1, -1)
    layout = (trainer["devices"], trainer["num_nodes"], data["batch_size"], trainer["accumulate_grad_batches"])
    assert layout == (8, 1, 1, 16)
    assert per_step(config) == 8 * 1 * 16 == 128
    assert trainer["precision"] == "bf16-mixed"
    assert callback(config, PROMOTION)["dirpath"] == "runs/dpo/release"
    assert callback(config, PROMOTION)["name"] == "moxin-7b-instruct"


def test_the_tokenizer_follows_init_from_when_a_flag_moves_it():
    config = printed_config(*configs(SFT), "--model.init_args.init_from=elsewhere/base")
    assert config["data"]["init_args"]["tokenizer"]["init_args"]["path"] == "elsewhere/base/tokenizer.model"


@pytest.mark.parametrize(
    ("file", "moxin", "ours"),
    [
        (
            SFT,
            (
                "seed_everything", "init_from", "attention", "loss_reduction", "lr", "schedule", "min_lr_ratio",
                "warmup_ratio", "weight_decay", "max_length", "batch_size", "num_nodes", "precision", "max_epochs",
                "accumulate_grad_batches", "every_n_epochs", "pack", "betas",
            ),
            ("activation_checkpointing", "compile", "gradient_clip_val"),
        ),
        (
            DPO_CONF,
            (
                "init_from", "loss_type", "beta", "lr", "schedule", "min_lr_ratio", "warmup_ratio", "weight_decay",
                "activation_checkpointing", "max_length", "batch_size", "devices", "precision", "max_epochs",
                "accumulate_grad_batches", "betas", "truncation",
            ),
            ("reference", "gradient_clip_val"),
        ),
    ],
    ids=["sft", "dpo"],
)  # fmt: skip
def test_each_instruct_setting_says_whether_moxin_published_it(file, moxin, ours):
    lines = setting_lines(file)
    for key in moxin:
        assert "# [Moxin]" in lines[key], lines[key]
    for key in ours:
        assert "# [ours]" in lines[key], lines[key]


# -- the CPU overlays -------------------------------------------------------------------------------------


def assert_a_cpu_run(config: dict) -> None:
    model, trainer = config["model"]["init_args"], config["trainer"]
    assert trainer["accelerator"] == "cpu"
    assert (trainer["devices"], trainer["num_nodes"], trainer["strategy"]) == (1, 1, "auto")
    assert (trainer["precision"], trainer["accumulate_grad_batches"]) == ("32-true", 1)
    assert model["preset"] == "moxin-tiny-9m"
    assert model["model_overrides"] == LOCAL_OVERRIDES
    assert (model["compile"], model["activation_checkpointing"]) == (False, False)
    assert config["data"]["init_args"]["max_length"] == 512 == model["model_overrides"]["sliding_window"]


def test_the_sft_overlay_is_a_cpu_run_on_builtin_chat_from_the_local_phase1_release():
    full, config = printed(SFT), printed(SFT, SFT_LOCAL)
    phase1 = printed(PHASES["phase1"], LOCAL)
    model, data, trainer = config["model"]["init_args"], config["data"]["init_args"], config["trainer"]
    assert_a_cpu_run(config)
    assert model["init_from"] == "runs/phase1/release" == callback(phase1, PROMOTION)["dirpath"]
    assert data["tokenizer"]["init_args"]["path"] == "runs/phase1/release/tokenizer.model"
    # the model's vocabulary is the local tokenizer's, which the phase 1 release ships
    assert model["model_overrides"]["vocab_size"] == phase1["data"]["init_args"]["tokenizer"]["init_args"]["vocab_size"]
    assert data["train"] == ["builtin-chat:pydoc", "builtin-chat:arithmetic?count=3000"]
    assert (data["val_fraction"], data["batch_size"], data["pack"]) == (0.02, 8, True)
    assert (model["lr"], trainer["max_steps"], trainer["val_check_interval"]) == (2e-3, 150, 50)
    assert trainer["max_steps"] % trainer["val_check_interval"] == 0  # the last validation lands on max_steps
    # what the overlay does not touch stays Moxin's
    for key in ("loss_reduction", "schedule", "warmup_ratio", "min_lr_ratio", "weight_decay", "betas"):
        assert model[key] == full["model"]["init_args"][key], key
    assert config["seed_everything"] == 123
    assert data["template"] == full["data"]["init_args"]["template"]
    assert trainer["gradient_clip_val"] == 1.0
    assert trainer["default_root_dir"] == "runs/sft"


def test_the_dpo_overlay_is_a_cpu_run_on_builtin_pairs_from_the_local_sft_release():
    full, config = printed(DPO_CONF), printed(DPO_CONF, DPO_LOCAL)
    sft = printed(SFT, SFT_LOCAL)
    model, data, trainer = config["model"]["init_args"], config["data"]["init_args"], config["trainer"]
    assert_a_cpu_run(config)
    assert model["init_from"] == "runs/sft/release" == callback(sft, PROMOTION)["dirpath"]
    assert data["tokenizer"]["init_args"]["path"] == "runs/sft/release/tokenizer.model"
    assert data["train"] == ["builtin-pairs:arithmetic?count=800"]
    assert (data["val_fraction"], data["batch_size"]) == (0.0, 4)
    assert (model["beta"], model["lr"], trainer["max_steps"]) == (2.0, 1e-3, 100)
    for key in ("loss_type", "reference", "schedule", "warmup_ratio", "min_lr_ratio", "weight_decay"):
        assert model[key] == full["model"]["init_args"][key], key
    assert (model["loss_type"], model["reference"]) == ("dpo_norm", "cache")
    assert trainer["max_epochs"] == 1
    assert trainer["default_root_dir"] == "runs/dpo"


@pytest.mark.parametrize(("full", "overlay"), [(SFT, SFT_LOCAL), (DPO_CONF, DPO_LOCAL)], ids=["sft", "dpo"])
def test_the_overlays_checkpoint_every_50_steps_and_keep_the_rest_of_each_callback(full, overlay):
    """jsonargparse merges two callback lists entry by entry only when they are as long as each other (else the
    later list replaces the earlier whole): each overlay lists the same callbacks as its config, so an entry
    keeps the settings the overlay does not restate."""
    alone, config = printed(full), printed(full, overlay)
    classes = [entry["class_path"] for entry in config["trainer"]["callbacks"]]
    assert classes == [entry["class_path"] for entry in alone["trainer"]["callbacks"]]
    checkpoint, original = callback(config, CHECKPOINT), callback(alone, CHECKPOINT)
    assert (checkpoint["every_n_epochs"], checkpoint["every_n_train_steps"]) == (None, 50)
    assert checkpoint["save_last"] is True
    assert checkpoint["save_top_k"] == original["save_top_k"]  # from the full config (SFT: -1, DPO: default 1)
    assert checkpoint["dirpath"] == original["dirpath"] == f"{alone['trainer']['default_root_dir']}/checkpoints"
    promotion, full_promotion = callback(config, PROMOTION), callback(alone, PROMOTION)
    # the release's folder stays the full config's; its name says it is a tiny local run, not Moxin-7B's
    assert {**promotion, "name": None} == {**full_promotion, "name": None}
    assert full_promotion["name"] in ("moxin-7b-sft", "moxin-7b-instruct")
    assert promotion["name"] == f"moxin-tiny-9m-local-{alone['trainer']['logger']['init_args']['name']}"


# -- the chain on a CPU -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_instruct_chain_runs_on_a_cpu_pretraining_then_sft_then_dpo(tmp_path):
    """phase 1 (short) -> SFT from its release -> DPO from SFT's release, each with its local overlay, in a fresh
    working folder and cache. SFT's first step is scored on phase 1's weights; DPO's first step on a policy equal
    to its (cached) reference, so its loss is ln 2 and its reward margin 0."""
    chain = FitChain(tmp_path)
    run, work, seconds = chain.run, chain.work, chain.seconds
    short = ["--trainer.max_steps=60", "--trainer.val_check_interval=30"]
    run("phase 1", *configs(PHASES["phase1"], LOCAL), *short)
    run("SFT", *configs(SFT, SFT_LOCAL), *short)
    csv_logger = chain.csv_logger("dpo")
    run("DPO", *configs(DPO_CONF, DPO_LOCAL), "--trainer.max_steps=30", *csv_logger)

    # every release is a Hugging Face folder of the tiny model, with the one local tokenizer passed down the chain
    releases = {stage: work / "runs" / stage / "release" for stage in ("phase1", "sft", "dpo")}
    models = {stage: import_hf(folder) for stage, folder in releases.items()}
    tokenizer = (releases["phase1"] / "tokenizer.model").read_bytes()
    for stage, model in models.items():
        assert (model.config.vocab_size, model.config.dim, model.config.n_layers) == (4096, 128, 4), stage
        assert (releases[stage] / "tokenizer.model").read_bytes() == tokenizer, stage
    assert not same_weights(models["phase1"], models["sft"])
    assert not same_weights(models["sft"], models["dpo"])

    # SFT: its first step's loss is phase 1's weights scored on SFT's first batch (init_from loaded them)
    sft = curves(releases["sft"])
    shipped = yaml.safe_load((releases["sft"] / "config.yaml").read_text())["data"]["init_args"]
    data = ChatData(
        train=shipped["train"],
        val_fraction=shipped["val_fraction"],
        tokenizer=SentencePieceTokenizer(work / shipped["tokenizer"]["init_args"]["path"]),
        template=TuluTemplate(),
        max_length=shipped["max_length"],
        pack=shipped["pack"],
        batch_size=shipped["batch_size"],
        seed=shipped["seed"],
    )
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        loss_sum, tokens = models["phase1"](
            batch["input_ids"], doc_ids=batch["doc_ids"], positions=batch["positions"], targets=batch["labels"]
        )
    assert sft["train"][0][0] == 1
    assert sft["train"][0][1] == pytest.approx(float(loss_sum / tokens), rel=1e-5)
    assert sft["train"][0][1] < math.log(4096) - 1  # trained weights: an untrained model scores ~ln 4096
    _, (first, val_first), (last, val_last) = sft["val"]
    assert (first, last) == (30, 60)
    assert val_last < val_first < math.log(4096) - 1, sft["val"]

    # DPO: policy == reference at the first step
    rows = csv_rows(tmp_path / "logs" / "dpo" / "fit" / "metrics.csv")
    assert [int(row["step"]) for row in rows if row.get("train/loss")] == list(range(30))
    for name in ("train/rewards_margin", "train/rewards_chosen", "train/rewards_rejected"):
        assert column(rows, name)[0] == pytest.approx(0.0, abs=1e-5), name
    assert column(rows, "train/loss")[0] == pytest.approx(math.log(2), abs=1e-4)
    assert curves(releases["dpo"])["train"][0] == (1, pytest.approx(math.log(2), abs=1e-4))
    # ... and the reference log-probs were scored once, on the SFT weights, and cached
    (cached,) = (tmp_path / "cache" / "reference_logps").iterdir()
    assert cached.suffix == ".pt" and len(cached.stem) == 24
    table = torch.load(cached, weights_only=True)
    assert table.shape == (800, 2)
    assert bool(torch.isfinite(table).all()) and bool((table < 0).all())
    shipped = yaml.safe_load((releases["dpo"] / "config.yaml").read_text())["data"]["init_args"]
    pairs = PreferenceData(
        train=shipped["train"],
        tokenizer=SentencePieceTokenizer(work / shipped["tokenizer"]["init_args"]["path"]),
        template=TuluTemplate(),
        max_length=shipped["max_length"],
        batch_size=shipped["batch_size"],
    )
    batch = next(iter(pairs.ordered_dataloader("train")))
    with torch.no_grad():
        chosen, rejected, _, _ = DPO.pair_logps(models["sft"], batch)
    expected = torch.stack([chosen, rejected], dim=1)
    torch.testing.assert_close(table[batch["pair_index"]], expected, rtol=1e-5, atol=1e-4)

    print(
        "\ninstruct chain on a CPU: "
        + ", ".join(f"{stage} {value:.0f} s" for stage, value in seconds.items())
        + f" (total {sum(seconds.values()):.0f} s); SFT first loss {sft['train'][0][1]:.3f}, "
        f"val/loss {[round(v, 3) for _, v in sft['val']]}; load average {os.getloadavg()}"
    )
