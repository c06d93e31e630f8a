"""Things made once on first use and kept: the local tokenizer and the built-in corpus, prepared.

They live under `$MOXIN_CACHE` (default `~/.cache/moxin_lightning`). Several processes of one run (DDP,
FSDP2) may ask at the same moment: a file lock lets the first build it while the others wait, and the
builders write to a temporary name and rename, so an interrupted build leaves nothing half-made.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def cache_root() -> Path:
    return Path(os.environ.get("MOXIN_CACHE", Path.home() / ".cache" / "moxin_lightning")).expanduser()


def cached_folder(kind: str, key: str) -> Path:
    """A readable, unique folder name for `key` (e.g. a builtin source spec plus a tokenizer hash)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", key).strip("-")[:60]
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / kind / f"{readable}-{digest}"


def build_once(folder: Path, is_built: Callable[[Path], bool], build: Callable[[Path], object]) -> Path:
    """`folder`, built by `build(folder)` unless `is_built(folder)`; one builder at a time across processes."""
    if is_built(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not is_built(folder):
            build(folder)
    return folder
