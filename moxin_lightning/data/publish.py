"""The output folder of `prepare`: refused, replaced or created as a whole, never left half-written.

The dataset is built in a hidden sibling `.OUTPUT.tmp-<pid>-<id>` (same file system, so the final step is a
rename). `publish` moves it into place; an old dataset that `overwrite` replaces is first renamed to
`.OUTPUT.old-<pid>-<id>` and deleted only once the new one is in place. Folders of those two kinds whose
process is gone (a run that was killed) are deleted by `remove_stale_temporaries`.
"""

from __future__ import annotations

import glob
import os
import shutil
import uuid
from pathlib import Path

from moxin_lightning.data.manifest import holds_dataset


def staging_folder(output: Path) -> Path:
    """A new, empty hidden sibling of `output` to build the dataset in."""
    folder = output.parent / f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    return folder


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse, before any work, an OUTPUT that `publish` would refuse at the end."""
    if not output.exists():
        return
    if not output.is_dir():
        raise FileExistsError(f"--output {output} is a file; pass a folder path")
    if holds_dataset(output):
        if not overwrite:
            raise FileExistsError(f"{output} already holds a prepared dataset; pass --overwrite to replace it")
    elif any(output.iterdir()):
        raise FileExistsError(f"{output} is not empty and is not a prepared dataset; pass a new or empty folder")


def publish(staging: Path, output: Path, overwrite: bool) -> None:
    """Move the finished dataset into place; an old dataset is removed only after the new one is there."""
    check_output(output, overwrite)
    if not output.exists():
        staging.rename(output)
        return
    if not holds_dataset(output):
        output.rmdir()  # empty, checked above
        staging.rename(output)
        return
    old = output.parent / f".{output.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    output.rename(old)
    staging.rename(output)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(output: Path) -> None:
    """Delete `.OUTPUT.tmp-<pid>-*` / `.OUTPUT.old-<pid>-*` folders whose process no longer runs."""
    for folder in output.parent.glob(f".{glob.escape(output.name)}.*-*-*"):
        kind, _, rest = folder.name.removeprefix(f".{output.name}.").partition("-")
        pid = rest.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
