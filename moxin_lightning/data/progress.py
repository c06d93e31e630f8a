"""Progress of a `prepare` run on stderr: sources done, documents and tokens so far, tokens/s."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from moxin_lightning.data.worker import read_reports


class Progress:
    """Prints documents and tokens done so far, every `interval` seconds, from the workers' reports.

    It writes with `os.write`, not `print`: workers may be forked while this thread runs, and a fork taken while
    the thread holds `sys.stderr`'s lock would leave that lock held forever in the child.
    """

    def __init__(self, stats_dir: Path, units: int, interval: float = 2.0) -> None:
        self.stats_dir, self.units, self.interval = stats_dir, units, interval
        self.start = time.perf_counter()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="prepare-progress", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval):
            self._print()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        self._print()

    def _print(self) -> None:
        reports = read_reports(self.stats_dir)
        done = sum(report["done"] for report in reports)
        documents = sum(_records(report, "train") + _records(report, "val") for report in reports)
        tokens = sum(report["train"]["tokens"] + report["val"]["tokens"] for report in reports)
        seconds = time.perf_counter() - self.start
        line = (
            f"prepare: {done}/{self.units} sources, {documents:,} documents, {tokens:,} tokens, "
            f"{tokens / max(seconds, 1e-9):,.0f} tokens/s, {seconds:.1f} s\n"
        )
        os.write(sys.stderr.fileno(), line.encode())


def _records(report: dict, split: str) -> int:
    """Documents (documents format) or records (instruction formats) a unit's report counts in `split`."""
    return report[split].get("documents", report[split].get("records", 0))
