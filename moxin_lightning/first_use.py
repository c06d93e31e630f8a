"""Things made once on first use and kept: the local tokenizer and the built-in corpus, prepared.

They live under `$MOXIN_CACHE` (default `~/.cache/moxin_lightning`). Several processes of one run (DDP,
FSDP2) may ask at the same moment: a file lock lets the first build it while the others wait, and the
builders write to a temporary name and rename, so an interrupted build leaves nothing half-made.

A build takes seconds to minutes before anything else shows, so the process that builds says what it is building
in one console line (Lightning's rank-zero info, as the other lines of `fit` before the first step).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

# What building a folder of each kind (`cached_folder(kind, ...)`) does, for its line. None: the builder says it
# itself (the instruction datamodules name the raw records they prepare).
BUILDS: dict[str, str | None] = {
    "data": "preparing the built-in corpus",
    "tokenizers": "training a tokenizer",
    "downloads": "downloading a remote folder",
    "records": None,
}


def cache_root() -> Path:
    return Path(os.environ.get("MOXIN_CACHE", Path.home() / ".cache" / "moxin_lightning")).expanduser()


def cached_folder(kind: str, key: str) -> Path:
    """A readable, unique folder name for `key` (e.g. a builtin source spec plus a tokenizer hash)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", key).strip("-")[:60]
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / kind / f"{readable}-{digest}"


def build_once(
    folder: Path, is_built: Callable[[Path], bool], build: Callable[[Path], object], what: str | None = None
) -> Path:
    """`folder`, built by `build(folder)` unless `is_built(folder)`; one builder at a time across processes.

    The builder first prints "first use: <what> into <folder>"; `what` defaults to what builds of the folder's
    kind do (`BUILDS`)."""
    if is_built(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not is_built(folder):
            _announce(folder, what)
            build(folder)
    return folder


def _announce(folder: Path, what: str | None) -> None:
    from lightning.pytorch.utilities import rank_zero_info  # only when building: `prepare` and the rest stay light

    what = what or BUILDS.get(folder.parent.name, "building")
    if what:
        rank_zero_info(f"first use: {what} into {folder} (once; later runs reuse it)")
