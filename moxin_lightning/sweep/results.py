"""A study's trials as rows, best first: `results.json`, `results.csv` (each replaced whole after every trial)
and the table printed at the end."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from moxin_lightning.atomic import written_file
from moxin_lightning.sweep.spec import SweepSpec

STATES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}


def trial_rows(spec: SweepSpec, study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial: complete ones best first, then pruned, failed and unfinished ones by number."""
    rows = [_row(spec, trial) for trial in study.get_trials(deepcopy=False)]
    sign = 1.0 if spec.goal == "minimize" else -1.0
    rank = {"complete": 0, "pruned": 1, "failed": 2}

    def order(row: dict[str, Any]) -> tuple:
        value = sign * row["value"] if row["state"] == "complete" else 0.0
        return rank.get(row["state"], 3), value, row["trial"]

    return sorted(rows, key=order)


def _row(spec: SweepSpec, trial: FrozenTrial) -> dict[str, Any]:
    state = STATES[trial.state]
    if state == "complete":
        value = trial.value
    elif trial.intermediate_values:  # pruned: its last reported value
        value = trial.intermediate_values[max(trial.intermediate_values)]
    else:
        value = None
    params = {p.name: p.decode(trial.params[p.name]) for p in spec.parameters if p.name in trial.params}
    return {
        "trial": trial.number,
        "state": state,
        "value": value,
        "params": params,
        "run_id": trial.user_attrs.get("run_id"),
        "run_dir": trial.user_attrs.get("run_dir"),
        "duration_s": None if trial.duration is None else round(trial.duration.total_seconds(), 1),
        "note": trial.user_attrs.get("note", ""),
    }


def write_results(spec: SweepSpec, rows: list[dict[str, Any]], folder: Path) -> None:
    """results.json (metric, best and every row) and results.csv (one column per parameter)."""
    complete = [row for row in rows if row["state"] == "complete"]
    summary = {
        "sweep": spec.name,
        "method": spec.method,
        "metric": {"name": spec.metric, "goal": spec.goal},
        "best": complete[0] if complete else None,
        "trials": rows,
    }
    _replace(folder / "results.json", json.dumps(summary, indent=2, default=str) + "\n")
    names = [p.name for p in spec.parameters if p.distribution is not None]
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["trial", "state", spec.metric, *names, "run_dir", "duration_s", "note"])
    for row in rows:
        params = [row["params"].get(name, "") for name in names]
        writer.writerow([row["trial"], row["state"], _blank(row["value"]), *params, row["run_dir"] or "",
                         _blank(row["duration_s"]), row["note"]])  # fmt: skip
    _replace(folder / "results.csv", text.getvalue())


def print_table(spec: SweepSpec, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = [p.name for p in spec.parameters if p.distribution is not None]
    table = Table(title=f"sweep {spec.name}: {spec.metric} ({spec.goal}), best first")
    for column in ("#", "state", spec.metric, *_short_names(names), "run dir", "note"):
        table.add_column(column, overflow="fold")
    for row in rows:
        params = [_format(row["params"].get(name)) for name in names]
        table.add_row(str(row["trial"]), row["state"], _format(row["value"]), *params, row["run_dir"] or "",
                      row["note"])  # fmt: skip
    Console(width=max(120, Console().width)).print(table)


def trial_line(spec: SweepSpec, row: dict[str, Any]) -> str:
    """The console line of a trial that just ended: number, state, metric, parameters (short names, as in the
    table), seconds and folder, and why it failed or was pruned. A trial's own output goes to its stdout.log, so
    without this line a sweep is silent for as long as its trials run."""
    names = [p.name for p in spec.parameters if p.distribution is not None]
    shown = zip(_short_names(names), names, strict=True)
    params = " ".join(f"{short}={_format(row['params'][name])}" for short, name in shown if name in row["params"])
    value = "" if row["value"] is None else f" {spec.metric}={_format(row['value'])}"
    note = f" ({row['note']})" if row["note"] and row["state"] != "complete" else ""
    ended = f"[{row['duration_s']} s] {row['run_dir']}{note}"
    return f"sweep {spec.name}: trial {row['trial']} {row['state']}{value} {params} {ended}"


def _short_names(names: list[str]) -> list[str]:
    """model.init_args.lr -> lr, unless two parameters would share the short name."""
    short = [name.rsplit(".", 1)[-1] for name in names]
    return [s if short.count(s) == 1 else name for s, name in zip(short, names, strict=True)]


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def _blank(value: Any) -> Any:
    return "" if value is None else value


def _replace(path: Path, text: str) -> None:
    with written_file(path) as temporary:
        temporary.write_text(text)
