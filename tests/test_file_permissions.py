"""Everything the platform writes is as readable as the user's umask makes any new file: safetensors writes its
weights 0600, and a release or export must not hide its weights from the group that can read the rest."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from moxin_lightning.atomic import written_as_a_whole
from moxin_lightning.hf import export_hf

from .conftest import tiny_model


@pytest.fixture
def umask():
    """Set a umask for the test, and give the previous one back."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def modes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_an_export_has_the_umask_permissions_weights_included(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    export_hf(tiny_model(), tmp_path / "m", max_shard_bytes=20_000)
    found = modes(tmp_path / "m")
    assert any(name.endswith(".safetensors") for name in found)
    assert found == {name: file_mode for name in found}
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == dir_mode


def test_a_private_file_in_a_folder_written_as_a_whole_becomes_group_readable(tmp_path, umask):
    umask(0o027)
    with written_as_a_whole(tmp_path / "out") as staging:
        (staging / "weights.bin").write_bytes(b"x")
        (staging / "weights.bin").chmod(0o600)
        (staging / "run.sh").write_text("#!/bin/sh\n")
        (staging / "run.sh").chmod(0o700)
    assert modes(tmp_path / "out") == {"run.sh": 0o750, "weights.bin": 0o640}
