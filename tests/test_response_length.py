"""ResponseLengthCurriculum: GRPO's response length and group size switch at the scheduled optimizer steps (seen in
the rollouts themselves and in the logged values; validation samples with the values of its step), a run resumed
before, at or after a switch uses the values of its restored step, and bad schedules are one-line errors before
training."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from moxin_lightning.callbacks import ResponseLengthCurriculum
from moxin_lightning.rewards import Reward
from tests.test_grpo_task import PROMPTS, DigitTokenizer, Prompts, grpo

SCHEDULE = {2: {"max_response_length": 3, "group_size": 4}, 4: {"max_response_length": 5}}
MAX_STEPS = 6
# (max_response_length, group_size) of each optimizer step: configured (1, 2), then the entries at steps 2 and 4
EXPECTED = [(1, 2)] * 2 + [(3, 4)] * 2 + [(5, 4)] * 2


class NoEosTokenizer(DigitTokenizer):
    """No EOS id: every completion runs to exactly max_response_length tokens."""

    eos_id, fingerprint = None, "digits-no-eos"

    def save(self, folder: str) -> None:  # checkpoints carry the data's tokenizer files
        (Path(folder) / "digits.txt").write_text(self.fingerprint)


class NoEosPrompts(Prompts):
    tokenizer = NoEosTokenizer()
    max_prompt_length = 2  # [BOS, x]

    def val_dataloader(self):
        return self.train_dataloader()


class Rollouts(Reward):
    """Scores nothing (0 each) and records, for each call, the trainer's stage and step and the rollouts it was
    given: (stage, global_step, response length, group size), read from the completions themselves."""

    name = "rollouts"

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int, int]] = []
        self.trainer: L.Trainer | None = None

    def __call__(self, completions: list[str], answers: list[str], prompts: list[str]) -> list[float]:
        (length,) = {len(c.split()) for c in completions}  # no EOS: every completion has the same length
        group, rest = divmod(len(completions), len(PROMPTS))
        assert rest == 0
        self.seen.append((self.trainer.state.stage.value, self.trainer.global_step, length, group))
        return [0.0] * len(completions)

    def stage(self, name: str) -> list[tuple[int, int, int]]:
        """(global_step, response length, group size) of each call in stage `name` ("train", "validate", ...)."""
        return [(step, length, group) for stage, step, length, group in self.seen if stage == name]


class Logged(Callback):
    """What each training batch logged, read after the curriculum (listed before it) logged its values."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.rows.append(
            (
                trainer.global_step - 1,  # the optimizer step this batch made
                metrics["train/max_response_length"].item(),
                metrics["train/group_size"].item(),
                metrics["train/completion_length"].item(),
            )
        )


def fit(root, ckpt_path=None, validate=True, schedule=SCHEDULE, task=None, data=None, rollouts=None):
    """A GRPO run of MAX_STEPS steps with the curriculum, a checkpoint after every step and (`validate`) a sanity
    validation and a validation after every step."""
    rollouts = rollouts or Rollouts()
    task = task or grpo(rewards=[rollouts], max_response_length=1, group_size=2)
    logged = Logged()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=MAX_STEPS, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=int(validate), limit_val_batches=int(validate), val_check_interval=1,
        callbacks=[
            ResponseLengthCurriculum(schedule),
            logged,
            ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}"),
        ],
    )  # fmt: skip
    rollouts.trainer = trainer
    # built here, not by the CLI, the task's hyperparameters hold the reward object itself: this test's own
    # checkpoints are unpickled whole (the CLI stores the rewards' class paths, read with weights_only)
    trainer.fit(task, data or NoEosPrompts(), ckpt_path=ckpt_path, weights_only=False if ckpt_path else None)
    return task, rollouts, logged


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("curriculum")
    task, rollouts, logged = fit(root)
    return root, task, rollouts, logged


def expected(steps) -> list[tuple[int, int, int]]:
    """(step, response length, group size) the schedule gives each of `steps` (past the last step: the last)."""
    return [(step, *EXPECTED[min(step, MAX_STEPS - 1)]) for step in steps]


def test_lengths_and_group_sizes_switch_at_the_scheduled_steps(uninterrupted):
    _, task, rollouts, logged = uninterrupted
    assert rollouts.stage("train") == expected(range(MAX_STEPS))
    assert [(length, group) for _, length, group in rollouts.stage("train")] == EXPECTED
    # validation samples with the values of the step it runs at: before training, and after each step
    assert rollouts.stage("sanity_check") == expected([0])
    assert rollouts.stage("validate") == expected(range(1, MAX_STEPS + 1))
    assert [step for step, *_ in logged.rows] == list(range(MAX_STEPS))
    assert [(length, group) for _, length, group, _ in logged.rows] == [(float(a), float(b)) for a, b in EXPECTED]
    assert [completion for *_, completion in logged.rows] == [float(a) for a, _ in EXPECTED]
    assert (task.max_response_length, task.group_size) == (5, 4)


@pytest.mark.parametrize("resume_step", [1, 2, 3])  # before the switch at 2, at it, and inside the phase it opens
def test_a_resumed_run_uses_the_values_of_its_restored_step(uninterrupted, tmp_path, resume_step):
    root = uninterrupted[0]
    task, rollouts, logged = fit(tmp_path, ckpt_path=str(root / "ckpt" / f"step={resume_step}.ckpt"))
    # a fresh task configured with (1, 2) goes on from the restored step with that step's values
    assert rollouts.stage("train") == expected(range(resume_step, MAX_STEPS))
    assert rollouts.stage("validate") == expected(range(resume_step + 1, MAX_STEPS + 1))
    assert rollouts.stage("sanity_check") == []  # Lightning does not sanity-check a resumed run
    assert [step for step, *_ in logged.rows] == list(range(resume_step, MAX_STEPS))
    assert [(length, group) for _, length, group, _ in logged.rows] == [
        (float(a), float(b)) for a, b in EXPECTED[resume_step:]
    ]
    assert (task.max_response_length, task.group_size) == (5, 4)


def test_an_entry_at_step_0_replaces_the_configured_values_from_the_start(tmp_path):
    _, rollouts, _ = fit(tmp_path, schedule={0: {"group_size": 3}, 5: {"max_response_length": 2}})
    assert rollouts.stage("sanity_check") == [(0, 1, 3)]  # the validation before the first step too
    assert rollouts.stage("train") == [(step, 1, 3) for step in range(5)] + [(5, 2, 3)]


class LongPrompts(NoEosPrompts):
    max_prompt_length = 8


@pytest.mark.parametrize(
    ("task", "data", "message"),
    [
        (
            None,
            LongPrompts(),
            r"^ResponseLengthCurriculum step 4: max_response_length=25 plus max_prompt_length=8 exceeds the model's "
            r"max_seq_len=32; raise model.init_args.model_overrides.max_seq_len or lower the schedule$",
        ),
        (
            BoringModel(),
            NoEosPrompts(),
            r"^ResponseLengthCurriculum needs a task with integer max_response_length and group_size \(GRPO\); "
            r"BoringModel has no max_response_length$",
        ),
    ],
)
def test_schedules_the_run_cannot_follow_fail_before_the_first_step(tmp_path, task, data, message):
    rollouts = Rollouts()
    task = task or grpo(rewards=[rollouts], max_response_length=1, group_size=2)
    schedule = {2: {"max_response_length": 20}, 4: {"max_response_length": 25}}
    with pytest.raises((ValueError, TypeError), match=message) as error:
        fit(tmp_path, schedule=schedule, task=task, data=data, rollouts=rollouts)
    assert "\n" not in str(error.value)
    assert rollouts.seen == []  # refused before any rollout, the sanity validation's included


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({}, r"^ResponseLengthCurriculum needs a non-empty schedule \{step: \{max_response_length: N, group_size: G"),
        ({-1: {"group_size": 4}}, r"^ResponseLengthCurriculum schedule step -1 must be an integer >= 0"),
        ({"1040": {"group_size": 4}}, r"^ResponseLengthCurriculum schedule step '1040' must be an integer >= 0"),
        ({3: 16384}, r"^ResponseLengthCurriculum schedule entry 3: 16384 must be \{max_response_length: N, gro"),
        ({3: {}}, r"^ResponseLengthCurriculum schedule entry 3: \{\} must be \{max_response_length: N, group_size"),
        (
            {3: {"max_length": 16384}},
            r"^ResponseLengthCurriculum schedule entry 3: unknown key 'max_length'; use max_response_length and/or "
            r"group_size$",
        ),
        ({3: {"max_response_length": 0}}, r"^ResponseLengthCurriculum schedule entry 3: max_response_length=0 must be"),
        (
            {3: {"group_size": 1}},
            r"^ResponseLengthCurriculum schedule entry 3: group_size=1 must be an integer >= 2 \(group-relative "
            r"advantages need 2 completions\)$",
        ),
        ({3: {"group_size": 2.5}}, r"^ResponseLengthCurriculum schedule entry 3: group_size=2.5 must be an integer"),
    ],
)
def test_malformed_schedules_are_refused_when_built(schedule, message):
    with pytest.raises(ValueError, match=message) as error:
        ResponseLengthCurriculum(schedule)
    assert "\n" not in str(error.value)


def test_deepscalers_schedule_is_the_grpo_deepscaler_overlay():
    """conf/grpo-deepscaler.yaml on conf/grpo.yaml: 8K responses and groups of 8 first, 16K and 16 from step 1040,
    24K from step 1520; the overlay appends the callback and keeps the config's own."""
    from jsonargparse import ArgumentParser

    from tests.test_cli import ROOT, configs, printed_config

    base = printed_config(*configs(ROOT / "conf" / "grpo.yaml"))
    config = printed_config(*configs(ROOT / "conf" / "grpo.yaml", ROOT / "conf" / "grpo-deepscaler.yaml"))
    model = config["model"]["init_args"]
    assert (model["max_response_length"], model["group_size"]) == (8192, 8)
    entries = config["trainer"]["callbacks"]
    assert entries[:-1] == base["trainer"]["callbacks"]
    assert entries[-1]["class_path"] == "moxin_lightning.callbacks.ResponseLengthCurriculum"
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[Callback])
    (curriculum,) = parser.instantiate(parser.parse_object({"callbacks": entries[-1:]})).callbacks
    assert curriculum.schedule == {
        1040: {"max_response_length": 16384, "group_size": 16},
        1520: {"max_response_length": 24576},
    }
    with pytest.raises(Exception, match="max_length"):
        parser.parse_object({"callbacks": [{**entries[-1], "init_args": {"schedule": {5: {"max_length": 3}}}}]})


def test_the_curriculum_changes_nothing_else_in_the_step():
    """A schedule whose entry restates the configured values gives the same first steps as no curriculum."""
    plain, with_curriculum = grpo(max_response_length=2), grpo(max_response_length=2)
    for task, callbacks in (
        (plain, []),
        (with_curriculum, [ResponseLengthCurriculum({1: {"max_response_length": 2}})]),
    ):
        L.Trainer(
            accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=callbacks,
        ).fit(task, Prompts())  # fmt: skip
    for a, b in zip(plain.model.parameters(), with_curriculum.model.parameters(), strict=True):
        assert torch.equal(a, b)
