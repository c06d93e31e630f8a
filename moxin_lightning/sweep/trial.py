"""One trial: the spec's command as a child process, watched through the metrics file it appends to.

The child runs in its own process group, so stopping a pruned trial also stops any workers it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STOP_GRACE_S = 10.0  # after SIGTERM, before SIGKILL


@dataclass
class TrialResult:
    returncode: int | None  # None: stopped by the sweep (pruned)
    values: list[float] = field(default_factory=list)  # the metric at each validation (hyperband's iterations)
    last: float | None = None  # its last logged value, the trial's objective (W&B's run summary)
    seen: set[str] = field(default_factory=set)  # every metric name logged
    stderr_tail: str = ""

    @property
    def stopped(self) -> bool:
        return self.returncode is None


class MetricsReader:
    """New whole records of a growing JSON-lines metrics file (see moxin_lightning/sweep/metrics_file.py)."""

    def __init__(self, path: Path, metric: str) -> None:
        self.path, self.metric = path, metric
        self._offset = 0

    def read(self, result: TrialResult) -> list[tuple[int, float]]:
        """Fold new records into `result`; return the metric's new validations as (1-based iteration, value)."""
        if not self.path.is_file():
            return []
        with self.path.open("rb") as stream:
            stream.seek(self._offset)
            chunk = stream.read()
        whole = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next read
        self._offset += len(whole)
        new = []
        for line in whole.decode().splitlines():
            record = json.loads(line) if line.strip() else {}
            metrics: dict[str, Any] = record.get("metrics", {})
            result.seen.update(metrics)
            if self.metric not in metrics:
                continue
            value = float(metrics[self.metric])
            result.last = value
            if record.get("event", "validation") == "validation":
                result.values.append(value)
                new.append((len(result.values), value))
        return new


def run_trial(
    command: list[str],
    env: dict[str, str],
    run_dir: Path,
    metric: str,
    should_stop: Callable[[int, float], bool] = lambda iteration, value: False,
    poll_s: float = 1.0,
) -> TrialResult:
    """Run `command` (output to run_dir/stdout.log and stderr.log) until it exits, or until `should_stop`
    (called with the 1-based iteration and value of each new validation) says to stop it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    reader = MetricsReader(Path(env["MOXIN_METRICS_FILE"]), metric)
    result = TrialResult(returncode=None)
    stderr_path = run_dir / "stderr.log"
    with (run_dir / "stdout.log").open("wb") as stdout, stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True
        )
        try:
            while True:
                exited = process.poll() is not None
                for iteration, value in reader.read(result):
                    if should_stop(iteration, value):
                        _stop(process)
                        result.stderr_tail = _last_line(stderr_path)
                        return result
                if exited:
                    break
                time.sleep(poll_s)
        finally:
            if process.poll() is None:  # interrupted (Ctrl-C) or pruned: no orphaned trial keeps running
                _stop(process)
    result.returncode = process.returncode
    result.stderr_tail = _last_line(stderr_path)
    return result


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the trial's process group, SIGKILL it if still there after STOP_GRACE_S."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_line(path: Path) -> str:
    """The last non-empty line of a log (progress bars' carriage returns split lines too)."""
    try:
        text = path.read_bytes()[-20000:].decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""
