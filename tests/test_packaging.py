"""The install layout: callbacks/ and datamodules/ live at the top of the repository but install inside the
project's namespace, so nothing named `callbacks` or `datamodules` reaches the top of site-packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools["package-dir"]
    assert mapped == {"moxin_lightning.callbacks": "callbacks", "moxin_lightning.datamodules": "datamodules"}
    folders = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "moxin_lightning").rglob("__init__.py")
    }
    folders |= set(mapped)
    assert sorted(setuptools["packages"]) == sorted(folders)


def test_callbacks_and_datamodules_import_from_the_namespace_only(tmp_path):
    """Run outside the checkout, as an installed user would: the namespaced names resolve to the repository's
    folders and the bare top-level names do not exist."""
    probe = (
        "import importlib.util, moxin_lightning.callbacks as c, moxin_lightning.datamodules as d;"
        "print(c.__name__, c.CheckpointPromotion.__module__, d.PretrainData.__module__);"
        "print(importlib.util.find_spec('callbacks'), importlib.util.find_spec('datamodules'))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        "moxin_lightning.callbacks moxin_lightning.callbacks.promotion moxin_lightning.datamodules.pretrain",
        "None None",
    ]
