"""Where a release came from: the code that made it (copied into code/) and its versions (version.json).

A reader must be able to rerun the exact source, so the project's own packages are bundled and the git
commit and library versions recorded; nothing here depends on the model or the release contents.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import moxin_lightning

# Import name -> folder in the checkout (pyproject.toml maps the two top-level folders into the namespace).
CODE_PACKAGES = {
    "moxin_lightning": "moxin_lightning",
    "moxin_lightning.callbacks": "callbacks",
    "moxin_lightning.datamodules": "datamodules",
}


def copy_code(destination: Path) -> list[str]:
    """Copy the Python source of this project's packages (and its pyproject.toml and conf/ when run from a
    checkout) to `destination`, laid out as in the checkout (callbacks/ and datamodules/ beside moxin_lightning/),
    so that `pip install -e` in `destination` reruns it; returns the packages copied."""
    root = _project_root()
    copied = []
    for name, folder in CODE_PACKAGES.items():
        spec = importlib.util.find_spec(name)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            continue
        source = Path(locations[0])
        for file in sorted(source.rglob("*.py")):
            if "__pycache__" in file.parts or (name == "moxin_lightning" and file.parent != source and (
                    file.relative_to(source).parts[0] in ("callbacks", "datamodules"))):  # fmt: skip
                continue
            target = destination / folder / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
        copied.append(name)
    if (root / "pyproject.toml").is_file():
        shutil.copyfile(root / "pyproject.toml", destination / "pyproject.toml")
        if (root / "conf").is_dir():
            shutil.copytree(root / "conf", destination / "conf", ignore=shutil.ignore_patterns(".*"))
    return copied


def _project_root() -> Path:
    return Path(moxin_lightning.__file__).resolve().parent.parent


def code_version() -> dict[str, Any]:
    """The code that made the release: package version, git commit (None outside a checkout) and libraries."""
    libraries = ("torch", "lightning", "litdata", "safetensors", "sentencepiece")
    return {
        "moxin_lightning": moxin_lightning.__version__,
        "git": git_state(_project_root()),
        "python": platform.python_version(),
        **{name: _installed_version(name) for name in libraries},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def git_state(root: Path) -> dict[str, Any] | None:
    """{"commit", "dirty"} when `root` is the top of a git checkout; None otherwise or without git.

    `dirty` counts changes to tracked files only: the release's code/ folder holds the exact source anyway."""
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root.resolve():
        return None
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _git(root: Path, *args: str) -> str | None:
    # GIT_OPTIONAL_LOCKS=0: `git status` must not take the index lock while someone commits in that checkout.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        result = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
