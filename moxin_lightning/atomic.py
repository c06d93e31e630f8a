"""Folders and files written as a whole or not at all: releases, tokenizers, prepared datasets, caches, results.

A folder is built in a hidden sibling `.NAME.tmp-<pid>-<id>` (same file system, so the last step is a rename),
then swapped into place; a folder it replaces is first renamed to `.NAME.old-<pid>-<id>` and deleted only once
the new one is there. Siblings of those two kinds whose process is gone (a run that was killed) are deleted
the next time the same folder is written.
"""

from __future__ import annotations

import glob
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def staging_folder(output: Path) -> Path:
    """A new, empty hidden sibling of `output` to build it in."""
    folder = output.parent / f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    return folder


def swap_into_place(staging: Path, output: Path) -> None:
    """Rename the finished `staging` to `output`; an existing `output` is removed only after that succeeded.

    Its files first get the permissions the user's umask gives any new file: some writers create private files
    (safetensors writes its weights 0600), and a release or dataset must be as readable by the group as the rest."""
    honour_umask(staging)
    if not output.exists():
        staging.rename(output)
        return
    old = output.parent / f".{output.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    output.rename(old)
    staging.rename(output)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def written_as_a_whole(output: Path) -> Iterator[Path]:
    """Yield a staging folder; on success it becomes `output`, on any error it is deleted and `output` untouched."""
    remove_stale_temporaries(output)
    staging = staging_folder(output)
    try:
        yield staging
        swap_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def written_file(output: Path) -> Iterator[Path]:
    """Yield a temporary sibling to write `output` to; on success it replaces `output` in one rename (a reader
    sees the old file or the new one, never part of one), on any error it is deleted."""
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.parent / f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield temporary
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)


def honour_umask(folder: Path) -> None:
    """Add to every file under `folder` the bits the umask allows: read and write, and execute where the owner has
    it (folders, scripts), as a file created anew with the umask would have."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o7777
        wanted = mode | (0o666 & ~mask) | (0o111 & ~mask if mode & 0o100 else 0)
        if wanted != mode:
            path.chmod(wanted)


def remove_stale_temporaries(output: Path) -> None:
    """Delete `.NAME.tmp-<pid>-*` / `.NAME.old-<pid>-*` siblings whose process no longer runs.

    A process killed between the two renames of `swap_into_place` leaves only `.NAME.old-*`: that is the
    previous complete `output`, so it is put back rather than deleted. Temporaries of this very process count
    as stale too (a restarted container often gets the same pid): it calls this before writing `output`."""
    for folder in sorted(output.parent.glob(f".{glob.escape(output.name)}.*-*-*")):
        kind, _, rest = folder.name.removeprefix(f".{output.name}.").partition("-")
        pid = rest.split("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and _process_exists(int(pid)):
            continue
        if kind == "old" and not output.exists():
            folder.rename(output)
        elif folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
        else:
            folder.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
