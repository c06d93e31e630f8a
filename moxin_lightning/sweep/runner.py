"""Run a sweep spec locally: Optuna picks each trial's values, a child process runs the spec's command.

The study lives in `<out>/<name>/study.db` (sqlite), so running the same command again continues it; each trial
gets `<out>/<name>/<run id>/` for its logs, its metrics file and (with sweeps/trial.yaml) its checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shlex
import sys
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution

from moxin_lightning.sweep.command import expand_command
from moxin_lightning.sweep.results import print_table, trial_line, trial_rows, write_results
from moxin_lightning.sweep.spec import SweepSpec
from moxin_lightning.sweep.trial import TrialResult, run_trial


class SweepFailed(ValueError):
    """No trial of the sweep produced its metric: a sweep that learned nothing must not exit 0 (a one-line error)."""


class TrialFailed(Exception):
    """A trial that exited with an error or never logged the metric; the sweep records it and goes on."""


def run_sweep(
    spec: SweepSpec,
    out: str | Path = "runs/sweeps",
    trials: int | None = None,
    seed: int | None = None,
    dry_run: bool = False,
    poll_s: float = 1.0,
) -> list[dict[str, Any]]:
    """Run `trials` more trials of `spec` (grid: by default the points not run yet); return the rows, best first."""
    if trials is not None and trials < 1:
        raise ValueError(f"--trials {trials}: give a positive number of trials")
    if spec.method != "grid" and trials is None and spec.run_cap is None:
        raise ValueError(f"method {spec.method} runs until stopped: give --trials N (or run_cap: N in the spec)")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the sweep prints its own line per trial
    folder = Path(out) / spec.name
    if dry_run:
        _print_dry_run(spec, folder, trials, seed)
        return []
    folder.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=spec.name,
        storage=f"sqlite:///{folder / 'study.db'}",
        direction=spec.direction,
        load_if_exists=True,
    )
    stored = study.user_attrs.get("spec_fingerprint")
    if stored is None:
        study.set_user_attr("spec_fingerprint", spec.fingerprint)
    elif stored != spec.fingerprint:
        raise ValueError(
            f"{folder / 'study.db'} holds a sweep with other parameters, method, metric or command; "
            f"delete {folder} or pass --out elsewhere"
        )
    done = len(study.trials)
    count = _trial_count(spec, study, trials)
    if count == 0:
        reason = (
            f"all {spec.grid_size()} grid points have run"
            if spec.method == "grid"
            else f"run_cap {spec.run_cap} reached"
        )
        print(f"sweep {spec.name}: {reason}; nothing to add")
    else:
        study.sampler = spec.sampler(None if seed is None else seed + done)  # a continued study draws anew
        study.pruner = spec.pruner()
        print(f"sweep {spec.name}: {count} trial(s) ({spec.method}; {spec.metric} {spec.goal}), study {folder}")
        study.optimize(
            lambda trial: _objective(spec, folder, trial, poll_s),
            n_trials=count,
            catch=(TrialFailed,),
            callbacks=[lambda study, trial: _after_trial(spec, folder, study, trial)],
        )
    rows = trial_rows(spec, study)
    write_results(spec, rows, folder)
    print_table(spec, rows)
    if rows and not any(row["state"] == "complete" for row in rows):
        failed = sum(row["state"] == "failed" for row in rows)
        raise SweepFailed(
            f"sweep {spec.name}: no trial produced {spec.metric} ({failed} of {len(rows)} failed); "
            f"each trial's output is in {folder}/<trial>/"
        )
    return rows


def _trial_count(spec: SweepSpec, study: optuna.Study, trials: int | None) -> int:
    done = len(study.trials)
    if spec.method == "grid":
        visited = {
            t.system_attrs["grid_id"] for t in study.trials if t.state.is_finished() and "grid_id" in t.system_attrs
        }
        remaining = spec.grid_size() - len(visited)
        count = max(0, remaining) if trials is None else min(trials, max(0, remaining))  # a grid never repeats
    elif trials is not None:
        count = trials
    else:  # run_cap (checked in run_sweep)
        count = spec.run_cap - done
    if spec.run_cap is not None:
        count = min(count, spec.run_cap - done)
    return max(0, count)


def _objective(spec: SweepSpec, folder: Path, trial: optuna.Trial, poll_s: float) -> float:
    sampled = {name: suggest(trial, name, dist) for name, dist in spec.searched.items()}
    run_id = f"{spec.name}-{trial.number:03d}-{secrets.token_hex(2)}"
    run_dir = folder / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    command, env = trial_command(spec, sampled, run_id, folder)
    (run_dir / "command.txt").write_text(shlex.join(command) + "\n")
    if "${args_json_file}" in spec.command:
        (run_dir / "args.json").write_text(json.dumps(spec.arguments(sampled)))
    trial.set_user_attr("run_id", run_id)
    trial.set_user_attr("run_dir", str(run_dir))

    def should_stop(iteration: int, value: float) -> bool:
        trial.report(value, iteration)
        return trial.should_prune()

    try:
        result = run_trial(command, env, run_dir, spec.metric, should_stop=should_stop, poll_s=poll_s)
    except KeyboardInterrupt:
        _note(trial, "interrupted (Ctrl-C)")  # Optuna records the trial as failed
        raise
    if result.stopped:
        _note(trial, f"pruned after {len(result.values)} validation(s)")
        raise optuna.TrialPruned()
    failure = trial_failure(spec.metric, result)
    if failure:
        _note(trial, failure)
        raise TrialFailed(failure)
    return result.last  # type: ignore[return-value]


def trial_failure(metric: str, result: TrialResult) -> str | None:
    """Why a finished trial failed, or None: a non-zero exit, or no (finite) last value of the metric."""
    if result.returncode:
        how = f"killed by signal {-result.returncode}" if result.returncode < 0 else f"exit {result.returncode}"
        return f"{how}: {result.stderr_tail or '(no stderr)'}"
    if result.last is None:
        logged = ", ".join(sorted(result.seen)) or "nothing"
        return f"{metric} was never logged (logged: {logged})"
    if not math.isfinite(result.last):
        return f"{metric} ended {result.last}"
    return None


def trial_command(
    spec: SweepSpec, sampled: dict[str, Any], run_id: str, folder: Path
) -> tuple[list[str], dict[str, str]]:
    """The trial's words (as W&B's agent builds them, with this Python as ${interpreter}) and environment."""
    run_dir = folder / run_id
    command = expand_command(
        spec.command,
        spec.arguments(sampled),
        program=spec.program,
        interpreter=sys.executable,
        args_json_file=str(run_dir / "args.json"),
    )
    env = {
        **os.environ,
        "WANDB_RUN_ID": run_id,  # as W&B's agent sets it; sweeps/trial.yaml names the run folder after it
        "WANDB_RUN_GROUP": spec.name,
        "MOXIN_SWEEP_NAME": spec.name,
        "MOXIN_SWEEP_DIR": str(folder),
        "MOXIN_METRICS_FILE": str(run_dir / "metrics.jsonl"),
    }
    return command, env


def suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(
            name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
        )
    return trial.suggest_float(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)


def _note(trial: optuna.Trial, text: str) -> None:
    trial.set_user_attr("note", text)


def _after_trial(spec: SweepSpec, folder: Path, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    rows = trial_rows(spec, study)
    write_results(spec, rows, folder)
    row = next(row for row in rows if row["trial"] == trial.number)
    print(trial_line(spec, row), flush=True)
    if spec.target is not None and row["state"] == "complete":
        reached = row["value"] <= spec.target if spec.goal == "minimize" else row["value"] >= spec.target
        if reached:
            print(f"sweep {spec.name}: {spec.metric} reached the target {spec.target}; stopping")
            study.stop()


def _print_dry_run(spec: SweepSpec, folder: Path, trials: int | None, seed: int | None) -> None:
    """The commands of the next trials, drawn from an in-memory study (nothing is written)."""
    count = trials if trials is not None else (spec.grid_size() if spec.method == "grid" else spec.run_cap)
    study = optuna.create_study(sampler=spec.sampler(seed), direction=spec.direction)
    for number in range(count):
        trial = study.ask()
        sampled = {name: suggest(trial, name, dist) for name, dist in spec.searched.items()}
        run_id = f"{spec.name}-{number:03d}-dryrun"
        command, _ = trial_command(spec, sampled, run_id, folder)
        print(f"WANDB_RUN_ID={run_id} MOXIN_METRICS_FILE={folder / run_id / 'metrics.jsonl'} {shlex.join(command)}")
