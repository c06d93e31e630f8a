"""One `fit` per run folder: a lock, no silent rerun over a finished run, and a finite length.

Two runs writing the same `trainer.default_root_dir` would interleave checkpoints and overwrite each other's
`last.ckpt` and release; a second run into a finished run's folder would write `last-v1.ckpt` beside the stale
`last.ckpt`, which a later `--ckpt_path .../last.ckpt` would then resume from. So `fit` takes an exclusive
lock on the folder before any logger or model starts (an OS lock, `flock`: released by the kernel when the
process dies, even by SIGKILL, so there is no stale lock to clean up), and refuses a folder that holds
checkpoints or a release unless the run resumes (`--ckpt_path`) or is told to start over (`--overwrite`,
which deletes the previous run's checkpoints and release first).

Only the first process of a multi-process run takes the lock and checks the folder (the others write into it
at its command); `validate` and `test` take no lock, so a running fit's checkpoints can be evaluated.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

LOCK_NAME = "run.lock"
OWNER_NAME = "run.lock.json"  # who holds the lock: the OS lock itself carries no process id or host


def is_first_process() -> bool:
    """Rank 0 of the job, judged from the launchers' environment (the strategy has not set ranks up yet)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


def check_length(max_steps: int | None, max_epochs: int | None, max_time: Any, allow_infinite: bool) -> None:
    """Refuse a run with no end: Lightning's max_steps=-1 without max_epochs or max_time trains an endless
    stream (pretraining) until the disk is full of checkpoints."""
    endless_steps = max_steps is None or max_steps == -1
    endless_epochs = max_epochs is None or max_epochs == -1
    if endless_steps and endless_epochs and not max_time and not allow_infinite:
        raise ValueError(
            "the run has no length: set trainer.max_steps (or trainer.max_epochs / trainer.max_time), "
            "or pass --allow_infinite to train until stopped"
        )


class RunFolder:
    """The exclusive lock on a run folder, held from `acquire` until `release` or the end of the process."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._lock: FileLock | None = None

    def acquire(self) -> None:
        """Take the lock, or refuse with one line naming the process and host that hold it."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.root / LOCK_NAME, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            owner = self._owner()
            raise ValueError(
                f"{self.root} is in use by another run (process {owner.get('pid', '?')} on host "
                f"{owner.get('host', '?')}); wait for it to end or set another trainer.default_root_dir"
            ) from None
        self._lock = lock
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (self.root / OWNER_NAME).write_text(json.dumps(owner) + "\n")

    def release(self) -> None:
        if self._lock is not None:
            (self.root / OWNER_NAME).unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def _owner(self) -> dict[str, Any]:
        try:
            return json.loads((self.root / OWNER_NAME).read_text())
        except (OSError, ValueError):  # the holder has not written it yet
            return {}


def previous_run(checkpoint_dirs: list[Path], release_dirs: list[Path]) -> list[Path]:
    """What a finished (or killed) earlier run left: its checkpoint files/folders and its release folders."""
    left: list[Path] = []
    for folder in checkpoint_dirs:
        if folder.is_dir():
            left += sorted(p for p in folder.iterdir() if p.name.endswith(".ckpt") and not p.name.startswith("."))
    return left + [folder for folder in release_dirs if folder.is_dir() and any(folder.iterdir())]


def check_rerun(checkpoint_dirs: list[Path], release_dirs: list[Path], resuming: bool, overwrite: bool) -> None:
    """Refuse a new run over an earlier one's checkpoints or release; with `overwrite`, delete them first."""
    if resuming:
        return
    left = previous_run(checkpoint_dirs, release_dirs)
    if not left:
        return
    if not overwrite:
        raise FileExistsError(
            f"{left[0]} is left from an earlier run; resume it with --ckpt_path "
            f"(e.g. --ckpt_path last), or pass --overwrite to delete its checkpoints and release and start over"
        )
    for path in left:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
