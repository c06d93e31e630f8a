"""Prepared datasets on an object store (`s3://bucket/prefix`, or any URL fsspec can write): upload and download.

`prepare --output s3://bucket/data/web` tokenizes into a local folder as for a local output (under
`$MOXIN_CACHE/uploads`, so it needs the dataset's size in local disk), then uploads it: every file but
`manifest.json` first, `manifest.json` last. The manifest is the commit marker: `manifest.read` and so
`PretrainData` refuse a prefix without one, so a reader never takes a half-uploaded dataset for a dataset. A
prefix that already holds a manifest is refused before any tokenizing unless `overwrite`; then the old manifest
is deleted first (readers refuse the prefix from that moment), then the old objects, then the new dataset goes
up, manifest last. Two runs writing the same prefix at once are not guarded against.

The endpoint and credentials come from the environment, where boto3 (litdata's index reads), s3fs (fsspec:
manifests, uploads, `--input` URLs) and obstore (litdata's chunk downloads, configured from boto3's client)
all take them: `AWS_ENDPOINT_URL` for an S3-compatible server (MinIO, Ceph, R2, ...), `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, or an AWS profile. Nothing here needs `storage_options`.

This module does not import Lightning.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from moxin_lightning.atomic import written_as_a_whole
from moxin_lightning.data.manifest import MANIFEST
from moxin_lightning.first_use import build_once, cached_folder


def is_remote(path: str | Path) -> bool:
    """Whether `path` is a URL (`s3://...`, `gs://...`) rather than a local folder, as the rest of the code
    decides it."""
    return "://" in str(path)


def _filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of `url` and the path in it, with listings fresh: another process (another
    `prepare`, another node) may have written the prefix since this process last looked."""
    from fsspec.core import url_to_fs

    filesystem, root = url_to_fs(url)
    filesystem.invalidate_cache()
    return filesystem, root.rstrip("/")


def remote_holds_dataset(url: str) -> bool:
    """Whether a prepared dataset (its `manifest.json`, the commit marker) is at `url`."""
    filesystem, root = _filesystem(url)
    return filesystem.exists(f"{root}/{MANIFEST}")


def _objects(filesystem: Any, root: str) -> list[str]:
    """Every object under `root/` (not `root` itself, nor a sibling prefix such as `root2/`)."""
    try:
        return sorted(path for path in filesystem.find(f"{root}/") if path.startswith(f"{root}/"))
    except FileNotFoundError:
        return []


def check_remote_output(url: str, overwrite: bool) -> None:
    """Refuse, before any work, a destination `upload_folder` would refuse at the end: a prepared dataset
    (without `overwrite`), or objects that are not one (without `overwrite`: another dataset's files, or what an
    interrupted upload left, which `overwrite` replaces)."""
    filesystem, root = _filesystem(url)
    if filesystem.exists(f"{root}/{MANIFEST}"):
        if not overwrite:
            raise FileExistsError(f"{url} already holds a prepared dataset; pass --overwrite to replace it")
    elif not overwrite and _objects(filesystem, root):
        raise FileExistsError(
            f"{url} holds objects but no {MANIFEST} (another dataset's files, or an interrupted upload); "
            "pass --overwrite to replace them, or a new prefix"
        )


def upload_folder(local: str | Path, url: str, overwrite: bool = False) -> None:
    """Upload the finished dataset folder `local` to `url`: every file but `manifest.json`, then `manifest.json`.

    With `overwrite`, what `url` held is deleted first, its manifest before anything else. Refused as by
    `check_remote_output` (checked again here: time has passed since `prepare` checked)."""
    local = Path(local)
    if not (local / MANIFEST).is_file():
        raise FileNotFoundError(f"{local} holds no {MANIFEST}; upload a folder that `prepare` finished")
    check_remote_output(url, overwrite)
    filesystem, root = _filesystem(url)
    old = _objects(filesystem, root)
    if old:  # overwrite (check_remote_output refused otherwise): the commit marker goes first
        if f"{root}/{MANIFEST}" in old:
            filesystem.rm_file(f"{root}/{MANIFEST}")
        filesystem.rm([path for path in old if path != f"{root}/{MANIFEST}"])
    files = sorted(path for path in local.rglob("*") if path.is_file() and path != local / MANIFEST)
    if files:
        targets = [f"{root}/{path.relative_to(local).as_posix()}" for path in files]
        filesystem.put([str(path) for path in files], targets)  # s3fs sends these concurrently
    filesystem.put_file(str(local / MANIFEST), f"{root}/{MANIFEST}")
    filesystem.invalidate_cache()


def staging_for(url: str, overwrite: bool) -> Path:
    """The local folder `prepare` builds a dataset for `url` in, once `url` has been checked (before any
    tokenizing). It is under `$MOXIN_CACHE/uploads`, one per URL; a copy left by a run killed during its upload
    is removed."""
    check_remote_output(url, overwrite)
    folder = cached_folder("uploads", url)
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def publish_remote(folder: Path, url: str, overwrite: bool) -> str:
    """Upload the dataset `prepare` finished in `folder` (from `staging_for`) to `url`, then delete `folder`."""
    try:
        upload_folder(folder, url, overwrite)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return url


def cached_copy(url: str, key: str) -> Path | None:
    """The folder at `url` (e.g. the `tokenizer/` a remote dataset carries), downloaded once into
    `$MOXIN_CACHE/downloads` (whole or not at all; one process downloads while the others of a run wait);
    `key` names the version (e.g. the tokenizer's fingerprint), so a changed remote folder is fetched anew.
    None when `url` holds no files."""
    url = url.rstrip("/")
    folder = cached_folder("downloads", f"{url}-{key}")
    if folder.is_dir():
        return folder
    filesystem, root = _filesystem(url)
    remote_files = _objects(filesystem, root)
    if not remote_files:
        return None

    def download(target: Path) -> None:
        with written_as_a_whole(target) as staging:
            for path in remote_files:
                destination = staging / path[len(root) + 1 :]
                destination.parent.mkdir(parents=True, exist_ok=True)
                filesystem.get_file(path, str(destination))

    return build_once(folder, Path.is_dir, download)


def _litdata_allows_plain_http() -> None:
    """Let litdata's obstore chunk downloads use an `http://` endpoint (MinIO on a LAN, a local test server).

    litdata 0.2.76 builds its obstore `S3Store` from boto3's endpoint without obstore's `allow_http` client
    option, so every chunk GET from an `http://` `AWS_ENDPOINT_URL` fails ("HTTP error: builder error",
    BadScheme) while boto3 reads `index.json` from it fine. The option only permits `http://` endpoints that
    were configured; AWS's own endpoints are `https://` either way. Done on import (PretrainData imports this
    module, and so does every litdata worker process, spawned or forked, when it unpickles the collate function)."""
    try:
        from litdata.streaming import downloader
    except ImportError:
        return
    options = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
    if isinstance(options, dict):
        options.setdefault("allow_http", True)


_litdata_allows_plain_http()
