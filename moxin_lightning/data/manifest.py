"""`manifest.json`: what a prepared dataset holds, and the fingerprint that identifies its tokens.

Training reads the manifest to check, before any work, that the data was made with the model's tokenizer
(`tokenizer.fingerprint`, `vocab_size`) and, on resume, that it is the same data (`fingerprint`).

The fingerprint is the sha256 of the manifest written as canonical JSON (sorted keys, no spaces) without the
fields that say where, when or in how many chunk files rather than what: `fingerprint` itself, `created`,
`moxin_lightning_version`, `litdata_version`, and every `input`, `path`, `skipped_examples`, `chunks` and
`chunk_sha256` (moving the inputs or the output, or another `num_workers`, does not change the data). What
remains pins the tokens exactly: each split's sha256 over its int32 token stream, the tokenizer's hash, the
document format and split rule, and each source's sha256 and counts.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from typing import Any

from moxin_lightning.json_files import parse_json, read_json

MANIFEST = "manifest.json"
FORMAT = "moxin_lightning.tokens/1"
SPLITS = ("train", "val")
_NOT_IDENTITY = frozenset(
    {"fingerprint", "created", "moxin_lightning_version", "litdata_version"}
    | {"input", "path", "skipped_examples", "chunks", "chunk_sha256"}  # chunk files: how many depends on workers
)


def holds_dataset(folder: Path) -> bool:
    """Whether `folder` already holds a prepared dataset (a manifest, or shards from an older layout)."""
    return (folder / MANIFEST).is_file() or any((folder / split / "index.json").is_file() for split in SPLITS)


def fingerprint(manifest: dict[str, Any]) -> str:
    canonical = json.dumps(_identity(manifest), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def build(body: dict[str, Any]) -> dict[str, Any]:
    """The manifest: `body` plus the format, versions, date and fingerprint, in a readable key order."""
    import litdata

    import moxin_lightning

    manifest = {
        "format": FORMAT,
        "fingerprint": "",
        **body,
        "moxin_lightning_version": moxin_lightning.__version__,
        "litdata_version": litdata.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest["fingerprint"] = fingerprint(manifest)
    return manifest


def write(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_REMAKE = "prepare the dataset again (python -m moxin_lightning prepare ... --output {folder})"


def read(folder: str | Path) -> dict[str, Any]:
    """The manifest of a prepared dataset, in a local folder or at an object-store URL (fsspec: s3://, gs://, ...);
    FileNotFoundError naming the fix when `folder` is not one."""
    missing = FileNotFoundError(
        f"no prepared dataset at {folder} (no {MANIFEST}); make it with: "
        f"python -m moxin_lightning prepare --input ... --tokenizer ... --output {folder}"
    )
    if "://" in str(folder):
        import fsspec

        try:
            with fsspec.open(f"{str(folder).rstrip('/')}/{MANIFEST}", "r", encoding="utf-8") as file:
                return parse_json(file.read(), f"{str(folder).rstrip('/')}/{MANIFEST}", _REMAKE.format(folder=folder))
        except FileNotFoundError:
            raise missing from None
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise missing
    return read_json(path, _REMAKE.format(folder=folder))


def _identity(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _identity(item) for key, item in value.items() if key not in _NOT_IDENTITY}
    if isinstance(value, list):
        return [_identity(item) for item in value]
    return value
