"""Moxin-Reasoning's configs: `conf/reasoning-sft.yaml` (the reasoning SFT of the DPO model) and its CPU overlay,
and the chain DPO -> reasoning SFT -> GRPO they form, full and local.

What must hold: the reasoning SFT is Moxin's SFT configuration on reasoning data, from the DPO release, its
settings marked [Moxin] or [ours]; the overlay turns it into a CPU run on the built-in think-form chat from the
local DPO release; GRPO starts from the release the reasoning SFT writes, and locally asks think-form prompts it
rewards with DeepScaleR's ThinkThenAnswer. The slow test runs the local chain on a CPU.
"""

from __future__ import annotations

import math

import pytest
import yaml

from moxin_lightning.data.builtin_chat import BOXED_INSTRUCTION, prompt_records_of
from moxin_lightning.hf import import_hf
from moxin_lightning.model.transformer import same_weights
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
)
from tests.test_instruct_configs import (
    DPO_CONF,
    DPO_LOCAL,
    PROMOTION,
    SFT,
    SFT_LOCAL,
    assert_a_cpu_run,
    per_step,
    printed,
    setting_lines,
)

REASONING_SFT, REASONING_SFT_LOCAL = ROOT / "conf" / "reasoning-sft.yaml", ROOT / "conf" / "reasoning-sft-local.yaml"
GRPO, GRPO_LOCAL = ROOT / "conf" / "grpo.yaml", ROOT / "conf" / "grpo-local.yaml"


def test_the_reasoning_sft_is_moxins_sft_configuration_from_the_dpo_release():
    config, sft = printed(REASONING_SFT), printed(SFT)
    model, data, trainer = config["model"]["init_args"], config["data"]["init_args"], config["trainer"]
    assert config["model"]["class_path"] == "moxin_lightning.tasks.SFT" and config["seed_everything"] == 123
    assert model["preset"] == "moxin-7b"
    assert model["init_from"] == "runs/dpo/release" == callback(printed(DPO_CONF), PROMOTION)["dirpath"]
    assert data["tokenizer"]["init_args"]["path"] == "runs/dpo/release/tokenizer.model"
    assert (model["lr"], model["schedule"], model["warmup_ratio"], model["min_lr_ratio"]) == (5e-6, "linear", 0.03, 0)
    assert (model["weight_decay"], model["betas"], model["loss_reduction"]) == (0.0, [0.9, 0.999], "sum")
    assert per_step(config) == 128 and trainer["max_epochs"] == 2
    assert (data["max_length"], data["pack"], data["train"]) == (4096, False, ["data/reasoning-sft"])
    # OpenThoughts' replies rewritten into the <think> ... </think> form GRPO's reward reads (Tülu's SFT: as written)
    assert (data["reasoning_markers"], sft["data"]["init_args"]["reasoning_markers"]) == ("think", None)
    # the same task, optimizer and data settings as Moxin's Tülu 3 SFT: only the start and the data differ
    for key in ("loss_reduction", "lr", "schedule", "warmup_ratio", "min_lr_ratio", "weight_decay", "betas"):
        assert model[key] == sft["model"]["init_args"][key], key
    for key in ("template", "max_length", "pack", "batch_size"):
        assert data[key] == sft["data"]["init_args"][key], key
    for key in ("devices", "num_nodes", "precision", "max_epochs", "accumulate_grad_batches", "gradient_clip_val"):
        assert trainer[key] == sft["trainer"][key], key
    promotion = callback(config, PROMOTION)
    assert (promotion["dirpath"], promotion["name"]) == ("runs/reasoning-sft/release", "moxin-7b-reasoning-sft")
    assert trainer["logger"]["init_args"]["name"] == "reasoning-sft"


def test_each_reasoning_sft_setting_says_whether_moxin_published_it():
    lines = setting_lines(REASONING_SFT)
    moxin = (
        "seed_everything", "init_from", "attention", "loss_reduction", "lr", "schedule", "min_lr_ratio",
        "warmup_ratio", "weight_decay", "betas", "max_length", "pack", "batch_size", "num_nodes",
        "precision", "max_epochs", "accumulate_grad_batches", "every_n_epochs",
    )  # fmt: skip
    for key in moxin:
        assert "# [Moxin]" in lines[key], lines[key]
    for key in ("activation_checkpointing", "compile", "gradient_clip_val", "reasoning_markers"):
        assert "# [ours]" in lines[key], lines[key]


def test_the_reasoning_sft_overlay_is_a_cpu_run_on_think_form_chat_from_the_local_dpo_release():
    full, config = printed(REASONING_SFT), printed(REASONING_SFT, REASONING_SFT_LOCAL)
    model, data, trainer = config["model"]["init_args"], config["data"]["init_args"], config["trainer"]
    assert_a_cpu_run(config)
    assert model["init_from"] == "runs/dpo/release" == callback(printed(DPO_CONF, DPO_LOCAL), PROMOTION)["dirpath"]
    assert data["tokenizer"]["init_args"]["path"] == "runs/dpo/release/tokenizer.model"
    assert data["train"] == ["builtin-chat:arithmetic_think?count=3000"]
    assert data["reasoning_markers"] == "think"  # the full config's: the built-in chat is in the think form already
    assert (data["val_fraction"], data["batch_size"], data["pack"]) == (0.02, 8, True)
    assert (model["lr"], trainer["max_steps"], trainer["val_check_interval"]) == (2e-3, 100, 50)
    for key in ("loss_reduction", "schedule", "warmup_ratio", "min_lr_ratio", "weight_decay", "betas"):
        assert model[key] == full["model"]["init_args"][key], key
    assert trainer["default_root_dir"] == "runs/reasoning-sft"
    classes = [entry["class_path"] for entry in config["trainer"]["callbacks"]]
    assert classes == [entry["class_path"] for entry in full["trainer"]["callbacks"]]  # merged entry by entry
    promotion = callback(config, PROMOTION)
    assert (promotion["dirpath"], promotion["name"]) == (
        "runs/reasoning-sft/release",
        "moxin-tiny-9m-local-reasoning-sft",
    )


def test_grpo_starts_from_the_reasoning_sft_release_and_locally_rewards_the_think_form():
    full, local = printed(GRPO), printed(GRPO, GRPO_LOCAL)
    assert full["model"]["init_args"]["init_from"] == callback(printed(REASONING_SFT), PROMOTION)["dirpath"]
    reasoning_local = callback(printed(REASONING_SFT, REASONING_SFT_LOCAL), PROMOTION)["dirpath"]
    assert local["model"]["init_args"]["init_from"] == reasoning_local == "runs/reasoning-sft/release"
    assert local["data"]["init_args"]["tokenizer"]["init_args"]["path"] == "runs/reasoning-sft/release/tokenizer.model"
    # the local prompts ask with the instruction the full config appends to DeepScaleR's problems
    assert full["data"]["init_args"]["instruction"] == BOXED_INSTRUCTION
    assert local["data"]["init_args"]["instruction"] is None  # built-in prompts carry it
    (train,) = local["data"]["init_args"]["train"]
    assert all(record["prompt"].endswith(f" {BOXED_INSTRUCTION}") for record in prompt_records_of(train))
    rewards = [entry["class_path"] for entry in local["model"]["init_args"]["rewards"]]
    assert rewards == ["moxin_lightning.rewards.ThinkThenAnswer", "moxin_lightning.rewards.Format"]
    assert [entry["class_path"] for entry in full["model"]["init_args"]["rewards"]] == rewards[:1]


@pytest.mark.slow
def test_the_reasoning_chain_runs_on_a_cpu_from_pretraining_to_grpo(tmp_path):
    """phase 1 -> SFT -> DPO -> reasoning SFT -> GRPO, each short, each with its local overlay and from the release
    of the stage before, in a fresh working folder and cache: every release carries the one local tokenizer, the
    reasoning SFT learns the think form (its validation loss falls), and GRPO samples and scores from its release."""
    chain = FitChain(tmp_path)
    run, work, seconds = chain.run, chain.work, chain.seconds
    short = ["--trainer.max_steps=60", "--trainer.val_check_interval=30"]
    run("phase 1", *configs(PHASES["phase1"], LOCAL), *short)
    run("SFT", *configs(SFT, SFT_LOCAL), *short)
    run("DPO", *configs(DPO_CONF, DPO_LOCAL), "--trainer.max_steps=20")
    run("reasoning SFT", *configs(REASONING_SFT, REASONING_SFT_LOCAL), *short)
    csv_logger = chain.csv_logger("grpo")
    run("GRPO", *configs(GRPO, GRPO_LOCAL), "--trainer.max_steps=4", "--trainer.val_check_interval=4", *csv_logger)

    releases = {stage: work / "runs" / stage / "release" for stage in ("dpo", "reasoning-sft", "grpo")}
    models = {stage: import_hf(folder) for stage, folder in releases.items()}
    tokenizer = (work / "runs" / "phase1" / "release" / "tokenizer.model").read_bytes()
    for stage, folder in releases.items():
        assert (folder / "tokenizer.model").read_bytes() == tokenizer, stage
    assert not same_weights(models["dpo"], models["reasoning-sft"])
    assert not same_weights(models["reasoning-sft"], models["grpo"])
    names = {stage: yaml.safe_load((folder / "config.yaml").read_text()) for stage, folder in releases.items()}
    assert names["reasoning-sft"]["model"]["init_args"]["init_from"] == "runs/dpo/release"
    assert names["grpo"]["model"]["init_args"]["init_from"] == "runs/reasoning-sft/release"

    sft = curves(releases["reasoning-sft"])
    (start, val_first), (middle, _), (end, val_last) = sft["val"]
    assert (start, middle, end) == (0, 30, 60)
    assert val_last < val_first / 2, sft["val"]  # the DPO model learns the think form

    rows = csv_rows(tmp_path / "logs" / "grpo" / "fit" / "metrics.csv")
    rewards = column(rows, "train/reward_mean")
    assert len(rewards) == 4 and all(0.0 <= reward <= 1.1 for reward in rewards)  # ThinkThenAnswer + 0.1 x Format
    assert all(0 < length <= 128 for length in column(rows, "train/completion_length"))
    assert all(math.isfinite(value) for value in column(rows, "train/loss"))
    print(
        "\nreasoning chain on a CPU: "
        + ", ".join(f"{stage} {value:.0f} s" for stage, value in seconds.items())
        + f"; reasoning SFT val/loss {[round(v, 3) for _, v in sft['val']]}; GRPO rewards {rewards}"
    )
