"""The output folder of `prepare`: refused, replaced or created as a whole, never left half-written.

The folder mechanics (hidden staging sibling, swap into place, clean-up of killed runs) are
`moxin_lightning.atomic`'s; this module adds what is particular to a dataset: which existing OUTPUT may be replaced.
"""

from __future__ import annotations

from pathlib import Path

from moxin_lightning.atomic import remove_stale_temporaries, staging_folder, swap_into_place
from moxin_lightning.data.manifest import holds_dataset

__all__ = ["check_output", "publish", "remove_stale_temporaries", "staging_folder"]


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
    """Move the finished dataset into place; an old dataset (or empty folder) goes only after the new one is there."""
    check_output(output, overwrite)
    swap_into_place(staging, output)
