"""The litdata side of `prepare`: write token shards with `litdata.optimize`, and read their tokens back.

Every litdata item is one document (an int32 array: BOS + ids + EOS), in one of two layouts that litdata's
readers do not share:
  * "documents" (default): litdata's default item loader. `StreamingDataset(dir)` yields one document per
    item, which `moxin_lightning.datamodules.PretrainData` needs (it packs documents itself and tracks their
    boundaries);
  * "tokens": `item_loader=TokensLoader()`. `StreamingDataset(dir, item_loader=TokensLoader(block_size=n))`
    cuts the concatenated stream into blocks of n tokens; blocks never cross a chunk boundary, so up to n - 1
    tokens at the end of each chunk are not read. The default reader refuses this layout, and TokensLoader
    refuses the other.
The token stream (the documents concatenated) is the same in both.

`litdata.optimize` changes process-wide state as a side effect: it sets the multiprocessing start method
(`force=True`), reseeds `random`, `numpy` and `torch`, installs its own SIGINT handler, and empties its
cache folders (by default shared ones under the temp dir, which would break a concurrent run). `write_shards`
gives it a private cache folder and puts the rest back afterwards, so calling `prepare` from a script or a
test leaves that script's state as it was.

Order: with `keep_data_ordered=True` and no input paths litdata hands worker k a contiguous slice of the units
and lists worker k's chunks before worker k+1's in `index.json`, so the items come in unit order, whatever
`num_workers` is. The tests check it.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

DTYPE = np.int32  # token ids as stored; litdata's readers take the dtype from index.json
LAYOUTS = ("documents", "tokens")
_HEADER_BYTES = 4  # litdata chunk: uint32 item count, uint32 offsets[count + 1], then the items' bytes
_FAILURES_ENV = "MOXIN_SHARD_FAILURES"  # folder where a litdata worker that failed writes why (see _guarded_loop)


def default_start_method() -> str:
    """'fork' on Linux: workers start in milliseconds and inherit the loaded tokenizer; 'spawn' re-imports torch
    in every worker (seconds each) but is the only safe choice on macOS and Windows."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def write_shards(
    fn: Callable[[int], Iterator[np.ndarray]],
    num_units: int,
    output_dir: Path,
    *,
    layout: str,
    num_workers: int,
    chunk_bytes: int | str,
    cache_dir: Path,
    start_method: str | None = None,
    num_nodes: int = 1,
    node_rank: int = 0,
) -> None:
    """Run `fn(unit)` for units 0..num_units-1 in `num_workers` processes; each array it yields is one item.

    With `num_nodes` > 1 this node runs only its share: litdata cuts the units into num_nodes x num_workers
    contiguous slices and writes chunks and a `{node_rank}-index.json` for this node's (see `nodes.py`)."""
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # older litdata asks PyPI on every optimize
    from litdata import optimize
    from litdata.streaming.item_loader import TokensLoader

    _guard_litdata_workers()
    failures = cache_dir / "failures"  # what a failed worker recorded (see _guarded_loop), raised here in one line
    failures.mkdir(parents=True, exist_ok=True)
    with _restored_process_state(cache_dir, num_nodes, node_rank):
        os.environ[_FAILURES_ENV] = str(failures)
        try:
            optimize(
                fn=fn,
                inputs=list(range(num_units)),
                output_dir=str(output_dir),
                chunk_bytes=chunk_bytes,
                item_loader=TokensLoader() if layout == "tokens" else None,
                num_workers=max(1, min(num_workers, num_units)),
                keep_data_ordered=True,
                reorder_files=False,
                start_method=start_method or default_start_method(),
                verbose=False,
            )
        except Exception:
            _raise_worker_failure(failures)
            raise
        finally:
            os.environ.pop(_FAILURES_ENV, None)
        _raise_worker_failure(failures)


def _guard_litdata_workers() -> None:
    """Make a litdata worker whose loop raises (e.g. a chunk write fails: disk full) stop its helper processes and
    say why in a file, instead of hanging.

    litdata 0.2.76 catches the error in the worker's `run`, queues it and lets the process exit; but the
    helpers that worker started (uploader, downloader, remover) are only told to stop on success, and a process
    waits for its non-daemon children at exit, so the worker never ends and `optimize` waits on it forever. The
    guard wraps `BaseWorker._loop`; installed when this module is imported, which a spawned worker does when it
    unpickles our function, and inherited by forked ones."""
    try:
        from litdata.processing import data_processor
    except ImportError:
        return
    worker = data_processor.BaseWorker
    if getattr(worker._loop, "_moxin_guarded", False):
        return
    loop = worker._loop

    def _guarded_loop(self: Any) -> None:
        try:
            loop(self)
        except BaseException as error:
            _record_failure(error)
            for helper in [*getattr(self, "uploaders", []), *getattr(self, "downloaders", []), self.remover]:
                if helper is not None and helper.is_alive():
                    helper.terminate()
                    helper.join(5)
            raise

    _guarded_loop._moxin_guarded = True  # type: ignore[attr-defined]
    worker._loop = _guarded_loop


def _record_failure(error: BaseException) -> None:
    """Write the failure of this worker (the OSError at its root, when there is one) where `write_shards` looks.
    Best effort: on a full disk even this small file may not fit, and then only its empty name is left."""
    folder = os.environ.get(_FAILURES_ENV)
    if not folder:
        return
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        record = {"errno": cause.errno, "strerror": cause.strerror, "filename": cause.filename, "message": str(cause)}
    else:
        record = {"errno": None, "message": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    path = Path(folder) / f"{os.getpid()}.json"
    try:
        path.write_text(json.dumps(record))
    except OSError:
        try:
            path.touch()
        except OSError:
            pass


def _raise_worker_failure(failures: Path) -> None:
    """Raise what a litdata worker recorded (an OSError as such, with its errno), in one line."""
    for path in sorted(failures.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            raise OSError(errno.ENOSPC, "a litdata worker failed writing shards (likely no space left)") from None
        if record.get("errno") is not None:
            raise OSError(record["errno"], record["strerror"], record["filename"]) from None
        raise RuntimeError(f"a litdata worker failed: {record['message'].splitlines()[0]}") from None


def index(split_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(split_dir) / "index.json").read_text())


def count_items(split_dir: str | Path) -> int:
    return sum(chunk["chunk_size"] for chunk in index(split_dir)["chunks"])


def read_tokens(split_dir: str | Path) -> Iterator[np.ndarray]:
    """The token stream of a prepared split, in order, in pieces: documents, or whole chunks for "tokens".

    The "documents" layout is read with litdata's own `StreamingDataset`; the "tokens" layout straight from the
    chunk files (TokensLoader would need a block size, and drops each chunk's tail).
    """
    split_dir = Path(split_dir)
    if (index(split_dir)["config"] or {}).get("item_loader") != "TokensLoader":
        from litdata import StreamingDataset

        dataset = StreamingDataset(str(split_dir))
        for position in range(len(dataset)):
            yield np.asarray(dataset[position])
        return
    for chunk in index(split_dir)["chunks"]:
        offset = _HEADER_BYTES * (chunk["chunk_size"] + 2)
        tokens = np.fromfile(split_dir / chunk["filename"], dtype=DTYPE, offset=offset)
        if tokens.size != chunk["dim"]:
            path = split_dir / chunk["filename"]
            raise ValueError(f"{path} holds {tokens.size} tokens but index.json says {chunk['dim']}; prepare it again")
        yield tokens


@contextmanager
def _restored_process_state(cache_dir: Path, num_nodes: int = 1, node_rank: int = 0) -> Iterator[None]:
    """Point litdata's cache folders at `cache_dir`, tell it the nodes (always: a value left in the environment
    by a launcher must not split a single-node run), and undo what `optimize` changes process-wide."""
    keys = (
        "DATA_OPTIMIZER_CACHE_FOLDER",
        "DATA_OPTIMIZER_DATA_CACHE_FOLDER",
        "DATA_OPTIMIZER_NUM_NODES",
        "DATA_OPTIMIZER_NODE_RANK",
        "DATA_OPTIMIZER_NUM_WORKERS",  # optimize sets it in the calling process
    )
    saved_env = {key: os.environ.get(key) for key in keys}
    saved_method = multiprocessing.get_start_method(allow_none=True)
    saved_sigint = signal.getsignal(signal.SIGINT)
    saved_random = random.getstate()
    saved_numpy = np.random.get_state()
    import torch

    saved_torch = torch.random.get_rng_state()
    os.environ[keys[0]] = str(cache_dir / "chunks")
    os.environ[keys[1]] = str(cache_dir / "data")
    os.environ[keys[2]] = str(num_nodes)
    os.environ[keys[3]] = str(node_rank)
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        multiprocessing.set_start_method(saved_method, force=True)
        if saved_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, saved_sigint)
        random.setstate(saved_random)
        np.random.set_state(saved_numpy)
        torch.random.set_rng_state(saved_torch)


_guard_litdata_workers()  # see its docstring: spawned workers import this module before running
