"""`python -m moxin_lightning sweep`: W&B sweep specs run offline with Optuna, and the specs shipped in sweeps/.

What must hold: every W&B parameter form becomes the Optuna distribution that samples the same values, and a
form Optuna cannot sample faithfully (or any mistake in the spec) is a one-line error before a trial runs; a
trial's command is word for word what W&B's agent builds; a trial's objective is the last value it logged of
the metric; failed trials are recorded and the sweep goes on; a rerun continues the study; hyperband stops
a trailing trial's process. Most trials here run a small Python program in place of `fit`; one runs `fit`.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from moxin_lightning.cli import main
from moxin_lightning.sweep.command import expand_command
from moxin_lightning.sweep.runner import suggest, trial_command
from moxin_lightning.sweep.spec import SpecError, load_spec, parameter, parse_spec
from tests.prepared_data import TINY_PRETRAIN_MODEL, write_dataset

ROOT = Path(__file__).resolve().parents[1]

# -- the spec ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"values": [1, 2, 4]}, CategoricalDistribution([1, 2, 4])),
        ({"distribution": "categorical", "values": ["adamw", "sgd"]}, CategoricalDistribution(["adamw", "sgd"])),
        ({"min": 1, "max": 5}, IntDistribution(1, 5)),
        ({"min": 0.1, "max": 1}, FloatDistribution(0.1, 1.0)),
        ({"distribution": "int_uniform", "min": 2, "max": 9}, IntDistribution(2, 9)),
        ({"distribution": "uniform", "min": 0, "max": 1}, FloatDistribution(0.0, 1.0)),
        ({"distribution": "q_uniform", "min": 0, "max": 10, "q": 2}, IntDistribution(0, 10, step=2)),
        ({"distribution": "q_uniform", "min": 0.5, "max": 1.5, "q": 0.25}, FloatDistribution(0.5, 1.5, step=0.25)),
        ({"distribution": "log_uniform", "min": -2, "max": 0}, FloatDistribution(math.exp(-2), 1.0, log=True)),
        ({"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}, FloatDistribution(1e-4, 1e-2, log=True)),
        ({"distribution": "inv_log_uniform_values", "min": 0.1, "max": 10}, FloatDistribution(0.1, 10.0, log=True)),
        ({"distribution": "inv_log_uniform", "min": 0, "max": 2}, FloatDistribution(math.exp(-2), 1.0, log=True)),
        ({"distribution": "q_log_uniform_values", "min": 1, "max": 64, "q": 1}, IntDistribution(1, 64, log=True)),
    ],
)
def test_each_wandb_form_is_the_optuna_distribution_of_the_same_values(config, expected):
    assert parameter("p", config).distribution == expected


def test_constants_are_fixed_flags_and_list_values_come_back_as_lists():
    assert (parameter("p", {"value": 3}).distribution, parameter("p", {"value": 3}).constant) == (None, 3)
    constant = parameter("p", {"distribution": "constant", "value": "x"})
    assert (constant.distribution, constant.constant) == (None, "x")
    betas = parameter("betas", {"values": [[0.9, 0.95], [0.9, 0.99]]})
    assert betas.distribution == CategoricalDistribution(["[0.9, 0.95]", "[0.9, 0.99]"])  # Optuna stores text
    assert betas.decode("[0.9, 0.99]") == [0.9, 0.99]


def spec_dict(**changes) -> dict:
    spec = {
        "program": "train.py",
        "method": "random",
        "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"x": {"min": 0.0, "max": 4.0}},
    }
    return {**spec, **changes}


def test_nested_parameters_are_dotted_flags_in_spec_order():
    spec = parse_spec(
        spec_dict(
            parameters={
                "model": {"parameters": {"init_args": {"parameters": {"lr": {"values": [0.1]}, "b": {"value": 2}}}}},
                "seed_everything": {"value": 7},
            }
        )
    )
    assert [p.name for p in spec.parameters] == ["model.init_args.lr", "model.init_args.b", "seed_everything"]
    assert spec.arguments({"model.init_args.lr": 0.1}) == {
        "model.init_args.lr": 0.1,
        "model.init_args.b": 2,
        "seed_everything": 7,
    }


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"method": "hyperopt"}, "method 'hyperopt' is not supported; use grid, random or bayes"),
        ({"metric": {"name": "val/loss", "goal": "lower"}}, "metric.goal 'lower' is not supported"),
        ({"metric": None}, "metric: give {name: <logged metric, e.g. val/loss>, goal: minimize|maximize}"),
        ({"parameters": {"x": {"distribution": "normal", "mu": 0, "sigma": 1}}}, "unknown key 'mu'"),
        (
            {"parameters": {"x": {"distribution": "normal"}}},
            "parameter x: distribution normal (a normal prior) has no faithful Optuna sampler; "
            "use uniform, log_uniform_values or values",
        ),
        (
            {"parameters": {"x": {"distribution": "loguniform", "min": 1, "max": 2}}},
            "unknown distribution 'loguniform'",
        ),
        ({"parameters": {"x": {"values": [1, 2], "probabilities": [0.5, 0.5]}}}, "`probabilities` has no Optuna"),
        (
            {"parameters": {"lr": {"distribution": "log_uniform_values", "min": "1e-4", "max": 1.0}}},
            "parameter lr: min '1e-4' is text (YAML reads 1e-4 without a dot as a string); write 1.0e-4",
        ),
        (
            {"parameters": {"n": {"distribution": "q_log_uniform_values", "min": 1, "max": 64, "q": 8}}},
            "q_log_uniform_values samples faithfully only with q: 1 and integer min/max",
        ),
        ({"parameters": {"x": {"distribution": "q_uniform", "min": 1, "max": 10, "q": 4}}}, "multiples of q=4"),
        (
            {"method": "grid"},
            "parameter x: method grid needs `values` (or `value`); list the values or use random/bayes",
        ),
        ({"parameters": {"x": {"min": 2.0, "max": 1.0}}}, "parameter x: min 2.0 is above max 1.0"),
        ({"controller": {"type": "local"}}, "unknown sweep key 'controller'"),
        ({"command": ["${interpreter}", "${argz}"]}, "command word ${argz} is not a W&B macro"),
        ({"early_terminate": {"type": "envelope"}}, "early_terminate: only {type: hyperband"),
        ({"early_terminate": {"type": "hyperband", "min_iter": 3, "strict": True}}, "strict has no Optuna"),
        ({"parameters": {"x": {"value": 1}}}, "every parameter is a constant"),
    ],
)
def test_a_spec_optuna_cannot_run_as_written_is_a_one_line_error(changes, message):
    with pytest.raises(SpecError) as error:
        parse_spec(spec_dict(**changes))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_the_cli_reports_a_bad_spec_as_one_line_before_any_trial(tmp_path, capsys):
    file = tmp_path / "bad.yaml"
    file.write_text(yaml.safe_dump(spec_dict(parameters={"lr": {"distribution": "beta"}})))
    with pytest.raises(SystemExit) as stop:
        main(["sweep", str(file), "--trials", "2", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "error: parameter lr: distribution beta (a beta prior) has no faithful Optuna sampler; "
        "use uniform, log_uniform_values or values\n"
    )
    assert not (tmp_path / "out").exists()


def test_hyperband_takes_wandbs_keys():
    spec = parse_spec(spec_dict(early_terminate={"type": "hyperband", "max_iter": 27, "s": 2, "eta": 3}))
    assert (spec.early_terminate.min_iter, spec.early_terminate.max_iter, spec.early_terminate.eta) == (3, 27, 3)
    pruner = spec.pruner()
    assert (pruner._min_resource, pruner._max_resource, pruner._reduction_factor) == (3, 27, 3)


def test_a_grid_is_every_combination_of_the_values():
    spec = parse_spec(spec_dict(method="grid", parameters={"a": {"values": [1, 2, 3]}, "b": {"values": ["x", "y"]}}))
    assert spec.grid_size() == 6
    assert spec.grid() == {"a": [1, 2, 3], "b": ["x", "y"]}


# -- the command ------------------------------------------------------------------------------------------


def test_the_command_is_word_for_word_what_the_wandb_agent_runs(tmp_path, monkeypatch):
    """Our expansion against wandb's own `Agent._command_run`, with every macro and an env-var word."""
    from wandb import wandb_agent

    command = [
        "${env}", "${interpreter}", "${program}", "fit", "--tag=${envvar:MOXIN_TEST_TAG}", "${args}",
        "${args_no_equals}", "${args_no_hyphens}", "${args_no_boolean_flags}", "${args_json}", "${args_json_file}",
        "${args_dict}", "${args_append_hydra}", "${args_override_hydra}", "${envvar:MOXIN_UNSET_VARIABLE}",
    ]  # fmt: skip
    arguments = {"model.init_args.lr": 0.001, "compile": True, "ckpt": False, "betas": [0.9, 0.95], "note": "a b"}
    for name, value in (("WANDB_DIR", str(tmp_path)), ("WANDB_SWEEP_ID", "sw1"), ("WANDB_RUN_ID", "")):
        monkeypatch.setenv(name, value)  # the agent sets these; monkeypatch restores them
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", "")
    monkeypatch.setenv("MOXIN_TEST_TAG", "t7")
    monkeypatch.delenv("MOXIN_UNSET_VARIABLE", raising=False)
    launched = []

    class Launched:  # stands in for the child process the agent would start
        def __init__(self, command, env, **kwargs):
            launched.append(command)

    monkeypatch.setattr(wandb_agent, "AgentProcess", Launched)
    agent = wandb_agent.Agent(api=None, queue=None)
    agent._sweep_command = list(command)
    agent._command_run(
        {"run_id": "run1", "program": "train.py", "args": {name: {"value": v} for name, v in arguments.items()}}
    )
    json_file = str(tmp_path / "wandb" / "sweep-sw1" / "config-run1.json")
    ours = expand_command(command, arguments, program="train.py", interpreter="python", args_json_file=json_file)
    assert ours == launched[0]
    assert ours[:6] == ["/usr/bin/env", "python", "train.py", "fit", "--tag=t7", "--model.init_args.lr=0.001"]
    assert ours[-1] == "MOXIN_UNSET_VARIABLE"


@pytest.mark.parametrize("name", ["phase1-lr-warmup", "dpo-beta", "grpo-group-kl"])
def test_each_shipped_spec_builds_a_fit_command_our_cli_accepts(name, monkeypatch, tmp_path):
    """The flags land on the model, the run gets its own folder from sweeps/trial.yaml, and W&B logs it."""
    spec = load_spec(ROOT / "sweeps" / f"{name}.yaml")
    assert spec.metric == {"phase1-lr-warmup": "val/loss", "dpo-beta": "val/rewards_accuracy"}.get(
        name, "val/reward_mean"
    )
    import optuna

    trial = optuna.create_study(sampler=spec.sampler(seed=0)).ask()
    sampled = {n: suggest(trial, n, d) for n, d in spec.searched.items()}
    command, env = trial_command(spec, sampled, f"{name}-000-abcd", tmp_path / name)
    assert command[:5] == ["/usr/bin/env", sys.executable, "-m", "moxin_lightning", "fit"]
    assert command[-len(sampled) :] == [f"--{n}={v}" for n, v in spec.arguments(sampled).items()]
    for variable in ("WANDB_RUN_ID", "MOXIN_SWEEP_DIR"):
        monkeypatch.setenv(variable, env[variable])
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["moxin_lightning"])
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), pytest.raises(SystemExit) as stop:
        main([*command[4:], "--print_config"])
    assert stop.value.code in (0, None)
    config = yaml.safe_load(stdout.getvalue())
    run_dir = f"{tmp_path / name}/{name}-000-abcd"
    assert config["trainer"]["default_root_dir"] == run_dir
    paths = [c["init_args"].get("dirpath") for c in config["trainer"]["callbacks"]]
    assert f"{run_dir}/checkpoints" in paths and f"{run_dir}/release" in paths
    assert config["trainer"]["logger"]["class_path"] == "moxin_lightning.loggers.WandbLogger"
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == run_dir
    for flag, value in spec.arguments(sampled).items():
        section, _, key = flag.partition(".init_args.")
        assert config[section]["init_args"][key] == value


# -- sweeps of a stand-in program -------------------------------------------------------------------------

PROGRAM = """
import json, os, sys, time
args = dict(word[2:].split("=", 1) for word in sys.argv[1:])
x, kind, steps, sleep = float(args["x"]), args.get("kind", "ok"), int(args.get("steps", 2)), float(args.get("sleep", 0))
print(os.environ["WANDB_RUN_ID"], os.environ["WANDB_RUN_GROUP"], os.environ["MOXIN_SWEEP_NAME"])
if kind == "crash":
    print("loading", file=sys.stderr)
    print("RuntimeError: simulated out of memory", file=sys.stderr)
    sys.exit(3)
trial_number = int(os.environ["WANDB_RUN_ID"].split("-")[-2])
for i in range(1, steps + 1):
    value = 1.0 + 10 * trial_number if kind == "by_order" else (x - 2.0) ** 2 + 1.0 / i
    metrics = {"train/loss": x} if kind == "silent" else {"val/loss": value}
    with open(os.environ["MOXIN_METRICS_FILE"], "a") as f:
        f.write(json.dumps({"step": 10 * i, "event": "validation", "metrics": metrics}) + "\\n")
    time.sleep(sleep)
"""


def objective(x: float, steps: int = 2) -> float:
    return (x - 2.0) ** 2 + 1.0 / steps


@pytest.fixture
def program(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    file = tmp_path / "program.py"
    file.write_text(PROGRAM)
    return file


def write_spec(folder: Path, name: str, **changes) -> Path:
    file = folder / f"{name}.yaml"
    file.write_text(yaml.safe_dump({**spec_dict(program=str(folder / "program.py")), **changes}))
    return file


def sweep(file: Path, *words: str) -> list[dict]:
    main(["sweep", str(file), "--out", "out", "--poll_s", "0.05", *words])
    return json.loads((Path("out") / file.stem / "results.json").read_text())["trials"]


def test_a_random_sweep_ranks_trials_by_their_last_logged_metric(program, capsys):
    file = write_spec(program.parent, "fake", parameters={"x": {"min": 0.0, "max": 4.0}, "steps": {"value": 2}})
    rows = sweep(file, "--trials", "3", "--seed", "0")
    assert [row["state"] for row in rows] == ["complete"] * 3
    assert sorted(row["trial"] for row in rows) == [0, 1, 2]
    assert [row["value"] for row in rows] == [objective(row["params"]["x"]) for row in rows]  # the last value
    assert [row["value"] for row in rows] == sorted(row["value"] for row in rows)  # best first
    summary = json.loads(Path("out/fake/results.json").read_text())
    assert summary["best"] == rows[0] and summary["metric"] == {"name": "val/loss", "goal": "minimize"}
    csv_lines = Path("out/fake/results.csv").read_text().splitlines()
    assert csv_lines[0] == "trial,state,val/loss,x,run_dir,duration_s,note"
    assert [int(line.split(",")[0]) for line in csv_lines[1:]] == [row["trial"] for row in rows]
    for row in rows:  # each trial ran with its own id, grouped under the sweep, in its own folder
        assert row["run_id"].startswith(f"fake-{row['trial']:03d}-")
        assert row["run_dir"] == f"out/fake/{row['run_id']}"
        assert (Path(row["run_dir"]) / "stdout.log").read_text() == f"{row['run_id']} fake fake\n"
    printed = capsys.readouterr().out
    table = printed[printed.index("best first") :]
    assert [table.index(row["run_dir"]) for row in rows] == sorted(table.index(row["run_dir"]) for row in rows)


def test_failed_trials_are_recorded_with_their_last_stderr_line_and_the_sweep_goes_on(program):
    parameters = {"kind": {"values": ["crash", "silent", "ok"]}, "x": {"value": 1.5}}
    rows = sweep(write_spec(program.parent, "failing", method="grid", parameters=parameters))
    by_kind = {row["params"]["kind"]: row for row in rows}
    assert by_kind["ok"]["state"] == "complete" and by_kind["ok"]["value"] == objective(1.5)
    assert by_kind["crash"]["state"] == "failed"
    assert by_kind["crash"]["note"] == "exit 3: RuntimeError: simulated out of memory"
    assert by_kind["silent"]["state"] == "failed"
    assert by_kind["silent"]["note"] == "val/loss was never logged (logged: train/loss)"
    assert rows[0] == by_kind["ok"]


def test_each_trial_prints_one_line_as_it_ends_with_its_number_parameters_and_metric(program, capsys):
    """In the order the trials ran, each with its state, metric, parameters, seconds and folder; a failed trial's
    line ends with why. The trial's own output stays in its folder."""
    parameters = {"kind": {"values": ["ok", "crash"]}, "x": {"values": [1.5, 3.0]}}
    rows = sweep(write_spec(program.parent, "lines", method="grid", parameters=parameters))
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sweep lines: trial ")]
    expected = {}
    for row in rows:
        x, ended = row["params"]["x"], f"[{row['duration_s']} s] {row['run_dir']}"
        if row["params"]["kind"] == "ok":
            expected[row["trial"]] = f"complete val/loss={objective(x):.6g} kind=ok x={x:g} {ended}"
        else:
            expected[row["trial"]] = (
                f"failed kind=crash x={x:g} {ended} (exit 3: RuntimeError: simulated out of memory)"
            )
    assert printed == [f"sweep lines: trial {number} {expected[number]}" for number in range(4)]


def test_a_grid_runs_each_point_once_and_a_rerun_continues_the_study(program, capsys):
    grid = {"x": {"values": [1.0, 2.0, 3.0]}, "kind": {"values": ["ok", "also"]}}
    file = write_spec(program.parent, "grid", method="grid", parameters=grid)
    rows = sweep(file, "--trials", "4")
    assert len(rows) == 4
    rows = sweep(file)  # the rest of the grid
    assert len(rows) == 6
    assert {(row["params"]["x"], row["params"]["kind"]) for row in rows} == set(
        itertools.product([1.0, 2.0, 3.0], ["ok", "also"])
    )
    assert sorted(row["trial"] for row in rows) == list(range(6))
    assert rows[0]["params"]["x"] == 2.0 and rows[0]["value"] == 0.5
    capsys.readouterr()
    assert len(sweep(file)) == 6
    assert "all 6 grid points have run; nothing to add" in capsys.readouterr().out

    file.write_text(yaml.safe_dump({**yaml.safe_load(file.read_text()), "parameters": {"x": {"values": [9.0]}}}))
    with pytest.raises(SystemExit) as stop:
        sweep(file)
    assert stop.value.code == 2
    assert "out/grid/study.db holds a sweep with other parameters, method, metric or command" in capsys.readouterr().err


def test_a_random_sweep_rerun_adds_trials(program):
    file = write_spec(program.parent, "more")
    assert len(sweep(file, "--trials", "2", "--seed", "1")) == 2
    rows = sweep(file, "--trials", "1", "--seed", "1")
    assert sorted(row["trial"] for row in rows) == [0, 1, 2]
    assert len({row["params"]["x"] for row in rows}) == 3  # the continued study draws new values


def test_hyperband_prunes_a_trailing_trial_and_stops_its_process(program):
    """The first trial logs 1.0 three times; the second logs 11.0, trails at its first validation, and stops."""
    parameters = {"x": {"values": [2.0, 6.0]}, "kind": {"value": "by_order"}, "steps": {"value": 3}}
    parameters["sleep"] = {"value": 1.0}
    hyperband = {"type": "hyperband", "min_iter": 1, "max_iter": 1, "eta": 2}  # one bracket, its rung at 1
    file = write_spec(program.parent, "pruned", method="grid", parameters=parameters, early_terminate=hyperband)
    started = time.monotonic()
    rows = sweep(file)
    good, bad = rows
    assert (good["trial"], good["state"], good["value"]) == (0, "complete", 1.0)
    assert (bad["trial"], bad["state"], bad["value"], bad["note"]) == (
        1,
        "pruned",
        11.0,
        "pruned after 1 validation(s)",
    )
    records = (Path(bad["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 1  # stopped before its second validation
    assert time.monotonic() - started < 3 * 1.0 + 2.5  # the good trial's 3 s, not 6 s for both


def test_random_and_bayes_need_a_trial_count_before_anything_is_written(program, capsys):
    file = write_spec(program.parent, "endless", method="bayes")
    with pytest.raises(SystemExit) as stop:
        sweep(file)
    assert stop.value.code == 2
    assert (
        capsys.readouterr().err
        == "error: method bayes runs until stopped: give --trials N (or run_cap: N in the spec)\n"
    )
    assert not Path("out").exists()
    file.write_text(yaml.safe_dump({**yaml.safe_load(file.read_text()), "run_cap": 2}))
    assert len(sweep(file)) == 2
    capsys.readouterr()
    assert len(sweep(file, "--trials", "5")) == 2  # run_cap bounds the study
    assert "sweep endless: run_cap 2 reached; nothing to add" in capsys.readouterr().out


def test_a_dry_run_prints_the_commands_and_writes_nothing(program, capsys):
    file = write_spec(program.parent, "dry", method="grid", parameters={"x": {"values": [1.0, 2.0]}})
    main(["sweep", str(file), "--dry_run"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.rsplit(" --x=", 1)[0] for line in lines] == [
        f"WANDB_RUN_ID=dry-00{n}-dryrun MOXIN_METRICS_FILE=runs/sweeps/dry/dry-00{n}-dryrun/metrics.jsonl "
        f"/usr/bin/env {sys.executable} {program}"
        for n in range(2)
    ]
    assert sorted(line.rsplit(" --x=", 1)[1] for line in lines) == ["1.0", "2.0"]
    assert not Path("runs").exists()


# -- one real trial of `fit` ------------------------------------------------------------------------------

TINY_FIT = """
{model}data:
  class_path: moxin_lightning.datamodules.PretrainData
  init_args: {{datasets: [{data}], seq_len: 32, batch_size: 2, val_batches: 2}}
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 4
  val_check_interval: 2
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: moxin_lightning.callbacks.CheckpointPromotion
      init_args: {{dirpath: "${{trainer.default_root_dir}}/release", include_code: false}}
"""


def test_a_real_fit_trial_reports_the_val_loss_the_run_logged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_FIT.format(model=TINY_PRETRAIN_MODEL, data=write_dataset(tmp_path / "data", 0, 100)))
    command = ["${env}", "${interpreter}", "-m", "moxin_lightning", "fit", "--config", str(config)]
    command += ["--config", str(ROOT / "sweeps" / "trial.yaml"), "${args}"]
    spec = {
        "method": "grid",
        "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"model.init_args.lr": {"values": [0.002]}},
        "command": command,
    }
    file = tmp_path / "real.yaml"
    file.write_text(yaml.safe_dump(spec))
    (row,) = sweep(file)
    assert row["state"] == "complete", row["note"]
    release = Path(row["run_dir"]) / "release"  # sweeps/trial.yaml put the run in the trial's folder
    curves = json.loads((release / "loss_curves.json").read_text())
    assert [step for step, _ in curves["val"]] == [0, 2, 4]  # 0: the starting weights
    assert row["value"] == pytest.approx(curves["val"][-1][1], rel=1e-6)
    assert yaml.safe_load((release / "config.yaml").read_text())["model"]["init_args"]["lr"] == 0.002
    assert list((Path(row["run_dir"]) / "wandb").glob(f"offline-run-*-{row['run_id']}"))  # a logged W&B run


# -- the metrics file a trial writes ----------------------------------------------------------------------


def test_the_metrics_file_gets_one_line_per_validation_and_one_at_fit_end_from_rank_zero(tmp_path):
    from types import SimpleNamespace

    import torch

    from moxin_lightning.callbacks import MetricsFile

    file = tmp_path / "m" / "metrics.jsonl"
    callback = MetricsFile(file)
    trainer = SimpleNamespace(sanity_checking=True, is_global_zero=True, global_step=0, callback_metrics={})
    trainer.callback_metrics = {"val/loss": torch.tensor(9.0)}
    callback.on_validation_end(trainer, None)  # the sanity check is not a validation of the run
    trainer.sanity_checking, trainer.global_step = False, 20
    trainer.callback_metrics = {"val/loss": torch.tensor(2.5), "train/loss": 3.0, "grid": torch.ones(2)}
    callback.on_validation_end(trainer, None)
    trainer.is_global_zero = False
    callback.on_validation_end(trainer, None)  # other ranks write nothing
    trainer.is_global_zero, trainer.global_step = True, 40
    trainer.callback_metrics = {"val/loss": torch.tensor(float("nan"))}
    callback.on_fit_end(trainer, None)
    assert [json.loads(line) for line in file.read_text().splitlines()] == [
        {"step": 20, "event": "validation", "metrics": {"val/loss": 2.5, "train/loss": 3.0}},
        {"step": 40, "event": "fit_end", "metrics": {"val/loss": "nan"}},
    ]


def test_a_sweep_whose_every_trial_failed_exits_2_with_one_line(program):
    """Through the real command line: no trial produced the metric, so the sweep is an error, not a result."""
    parameters = {"kind": {"values": ["crash", "silent"]}, "x": {"value": 1.5}}
    file = write_spec(program.parent, "all-failing", method="grid", parameters=parameters)
    words = [sys.executable, "-m", "moxin_lightning", "sweep", str(file), "--out", "out", "--poll_s", "0.05"]
    result = subprocess.run(words, capture_output=True, text=True, timeout=300, cwd=program.parent)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: sweep all-failing: no trial produced val/loss (2 of 2 failed); each trial's output is in "
        "out/all-failing/<trial>/"
    )
    rows = json.loads((program.parent / "out" / "all-failing" / "results.json").read_text())["trials"]
    assert [row["state"] for row in rows] == ["failed", "failed"]  # the results are still written
