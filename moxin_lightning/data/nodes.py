"""`prepare` across nodes: every node tokenizes its share of the units into one shared folder; the last node checks
the whole, writes `manifest.json` and publishes.

    srun --nodes 4 --ntasks-per-node 1 python -m moxin_lightning prepare --input 'corpus/*.jsonl.zst' \\
        --tokenizer tokenizer.model --output /shared/data/c1 --num_workers 32

Which units a node tokenizes is litdata's own multi-node mapping: `write_shards` sets `DATA_OPTIMIZER_NUM_NODES` and
`DATA_OPTIMIZER_NODE_RANK` around `litdata.optimize`, which cuts the units into num_nodes x num_workers contiguous
slices (so every node must pass the same `--num_workers`), names each chunk after its worker's global rank, and
writes one `{node_rank}-index.json` per node. The token streams are the single-node run's: slices in global rank
order are the units in order, and the manifest's split hashes and fingerprint come out equal (its `chunks` counts
differ, and are not part of the fingerprint).

What litdata 0.2.76 does not do for a local (shared) `output_dir`, this module does. There, every node's `optimize`
first deletes every `*.bin` and `*index.json` already in the folder (another node's finished chunks), merges every
worker index it finds there into its own node index (another node's workers' too), and the last node merges the
node indexes that happen to exist, without waiting for the others (it waits only for `s3://`, `gs://`, `r2://`).
Two nodes writing one local folder lose one node's data. So each node gives litdata a folder of its own,
`STAGING/.work/nodes/<rank>/{train,val}`, and writes `done.json` there when its part is finished (or an error);
the last node waits for every `done.json`, then moves the chunks into `STAGING/{train,val}` with one `index.json`
listing the nodes' chunks in node order: what litdata's last node does with an object store's node indexes.

The shared folder `STAGING` is `.OUTPUT.tmp-nodes-<hash>` beside OUTPUT, the hash covering the command's identity
(inputs as given, tokenizer fingerprint, format and its settings, layout, chunk size, val_fraction, seed, number of
nodes), so every node of one command finds the same folder without talking to the others. `--num_workers` is
required with more than one node (its default, the CPUs of each node, may differ between nodes) and is not in the
hash: each node writes what it was given (`identity.json`, with the input files it found) and a node whose
arguments or files differ from another's is refused with one line. Unit reports (`STAGING/.work/stats`) and
validation documents (`STAGING/.work/val`) are shared, one file per unit: the val `optimize` of a node runs over
all units with the same `num_workers`, so litdata gives it exactly the units it tokenized.

Failures: a worker's error is a unit report as on one node (the `failed` flag there stops every node's workers);
a node that fails writes its message to its `done.json` and exits non-zero; the last node reports the first error
in one line and deletes `STAGING` (after giving the other nodes up to 2 minutes to stop writing there). A run that
was killed leaves `STAGING` behind; delete it (`rm -r STAGING`) before starting the nodes again. A node that finds
its own folder there refuses to start and says so, and the last node then reports it and deletes the folder, but
a last node that already took the earlier run's `done.json` of that node uses its work (the same command's, unless
the input files changed in between). Nodes do not check that they run at the same time: a node started once alone
leaves its part there for the next run, which refuses it as above.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moxin_lightning.atomic import written_file
from moxin_lightning.data.sources import DataError

NODE_REPORTS = "nodes"
DONE = "done.json"
IDENTITY = "identity.json"
FAILED_WAIT_SECONDS = 120.0  # a failing last node waits this long for the other nodes to stop before cleaning up
REPORTS_WAIT_SECONDS = 120.0  # NFS may list a directory from its cache for a while: reports can show up late
WAIT_MESSAGE_SECONDS = 600.0


@dataclass(frozen=True)
class Nodes:
    """How many nodes prepare one dataset, and which one this process is (0-based; the last one publishes)."""

    count: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.count < 1:
            raise DataError(f"--num_nodes must be at least 1, got {self.count}")
        if not 0 <= self.rank < self.count:
            last = self.count - 1
            raise DataError(f"--node_rank must be in 0 .. {last} for --num_nodes {self.count}, got {self.rank}")

    @property
    def last(self) -> bool:
        return self.rank == self.count - 1


def resolve_nodes(num_nodes: int | None, node_rank: int | None, environ: dict[str, str] | None = None) -> Nodes:
    """The command line's nodes: `--num_nodes` / `--node_rank` when given, each value on its own; else the first of

    * litdata's `DATA_OPTIMIZER_NUM_NODES` and `DATA_OPTIMIZER_NODE_RANK` (rank 0 when unset);
    * inside an `srun` step with one task per node: `SLURM_STEP_NUM_TASKS` nodes, rank `SLURM_PROCID`;
    * under `torchrun --nproc_per_node 1`: `WORLD_SIZE` nodes, rank `GROUP_RANK`;

    else one node. An `srun` step or `torchrun` with more than one process on a node is refused (prepare starts
    its own workers on each node), and so is `--num_nodes N > 1` with no rank from anywhere.
    """
    environ = os.environ if environ is None else environ
    if num_nodes is None or node_rank is None:
        found = _launcher_nodes(environ)
        if found is not None:
            num_nodes = found[0] if num_nodes is None else num_nodes
            node_rank = found[1] if node_rank is None else node_rank
    num_nodes = 1 if num_nodes is None else num_nodes
    if node_rank is None:
        if num_nodes > 1:
            raise DataError(
                f"--num_nodes {num_nodes} needs --node_rank (0 .. {num_nodes - 1}) on each node, "
                "or a launcher that sets it (srun, torchrun)"
            )
        node_rank = 0
    return Nodes(num_nodes, node_rank)


def _launcher_nodes(environ: dict[str, str]) -> tuple[int, int] | None:
    if environ.get("DATA_OPTIMIZER_NUM_NODES"):
        return int(environ["DATA_OPTIMIZER_NUM_NODES"]), int(environ.get("DATA_OPTIMIZER_NODE_RANK") or 0)
    if environ.get("SLURM_STEP_NUM_TASKS") and environ.get("SLURM_STEP_NUM_NODES"):
        tasks, nodes = int(environ["SLURM_STEP_NUM_TASKS"]), int(environ["SLURM_STEP_NUM_NODES"])
        if tasks != nodes:
            raise DataError(
                f"srun started {tasks} tasks on {nodes} nodes; prepare runs one task per node "
                "(srun --ntasks-per-node 1) and starts its own --num_workers there"
            )
        return nodes, int(environ.get("SLURM_PROCID") or 0)
    if environ.get("GROUP_RANK") and environ.get("WORLD_SIZE"):
        per_node = int(environ.get("LOCAL_WORLD_SIZE") or 1)
        if per_node != 1:
            raise DataError(
                f"torchrun started {per_node} processes per node; prepare runs one per node "
                "(torchrun --nproc_per_node 1) and starts its own --num_workers there"
            )
        return int(environ["WORLD_SIZE"]), int(environ["GROUP_RANK"])
    return None


class NodeRun:
    """This node's part of a multi-node `prepare`: the shared staging folder, this node's folder in it, the markers
    the nodes leave there, and (last node) the wait for every node and the merge of their shards."""

    def __init__(self, output: Path, nodes: Nodes, identity: dict[str, Any], units: list[str]) -> None:
        self.nodes = nodes
        given = {key: value for key, value in identity.items() if key != "num_workers"}
        key = hashlib.sha256(json.dumps(given, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.staging = output.parent / f".{output.name}.tmp-nodes-{key}"
        self.reports = self.staging / ".work" / NODE_REPORTS
        self.folder = self.reports / str(nodes.rank)
        self.record = {"identity": identity, "units": units}
        self.finished = False

    def start(self) -> None:
        """Create this node's folder in the shared staging folder; refuse a folder an earlier run left, or a node
        already there that was given other arguments or found other input files."""
        self.reports.mkdir(parents=True, exist_ok=True)
        try:
            self.folder.mkdir()
        except FileExistsError:
            error = DataError(
                f"{self.staging} already holds node {self.nodes.rank}'s work from an earlier run that did not finish; "
                "delete that folder and start every node again"
            )
            self.finish(str(error))  # a last node waiting in that folder stops with this line
            raise error from None
        record = {**self.record, "host": socket.gethostname(), "pid": os.getpid()}
        _write_json(self.folder / IDENTITY, record)
        try:
            for rank in range(self.nodes.count):
                if rank != self.nodes.rank and (self.reports / str(rank) / IDENTITY).is_file():
                    self._compare(rank)
        except DataError as error:
            self.finish(str(error))
            raise

    def node_folder(self, split: str) -> Path:
        """Where litdata writes this node's shards of `split`."""
        return self.folder / split

    def finish(self, error: str | None = None) -> None:
        """Tell the last node this node is done (or failed, with a one-line message)."""
        if self.finished or not self.folder.is_dir():  # never recreate a staging folder the last node deleted
            return
        _write_json(self.folder / DONE, {"error": error, "host": socket.gethostname()})
        self.finished = True

    def fail(self, error: BaseException, stats_dir: Path) -> None:
        """After an error on this node: report it; the last node also stops the others and deletes the staging."""
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        self.finish(message)
        if not self.nodes.last:
            return
        if isinstance(error, Exception):  # not on Ctrl-C / a job being cancelled: clean up at once
            stats_dir.mkdir(parents=True, exist_ok=True)
            (stats_dir / "failed").touch()  # every node's workers skip their remaining units
            self.wait(timeout=FAILED_WAIT_SECONDS, quiet=True)  # so none writes into the folder after it is deleted
        shutil.rmtree(self.staging, ignore_errors=True)

    def wait(self, timeout: float | None = None, quiet: bool = False) -> dict[int, dict[str, Any]]:
        """Wait for every node's `done.json` (the last node, after its own part); return them by rank."""
        done: dict[int, dict[str, Any]] = {}
        start = printed = time.monotonic()
        reported: set[int] = set()
        while True:
            for rank in range(self.nodes.count):
                if rank not in done:
                    marker = _read_json(self.reports / str(rank) / DONE)
                    if marker is not None:
                        done[rank] = marker
            missing = [rank for rank in range(self.nodes.count) if rank not in done]
            if not missing or (timeout is not None and time.monotonic() - start > timeout):
                return done
            now = time.monotonic()
            if not quiet and (set(missing) != reported or now - printed > WAIT_MESSAGE_SECONDS):
                reported, printed = set(missing), now
                others = sorted(
                    path.name
                    for path in self.staging.parent.glob(f"{glob.escape(self.staging.name.rsplit('-', 1)[0])}-*")
                    if path != self.staging
                )
                hint = f" (beside it: {', '.join(others)}: a node given other arguments works there)" if others else ""
                _say(
                    f"prepare: node {self.nodes.rank} (last of {self.nodes.count}) waits for node(s) "
                    f"{', '.join(map(str, missing))} to finish in {self.staging}{hint}"
                )
            time.sleep(0.5)

    def check_nodes(self, done: dict[int, dict[str, Any]]) -> None:
        """After `wait`: one-line errors for a node that failed, or a node given other arguments than this one."""
        failed = [(rank, marker["error"]) for rank, marker in sorted(done.items()) if marker.get("error")]
        if failed:
            rank, message = failed[0]
            raise _prepare_error(f"node {rank} of {self.nodes.count} failed: {message}")
        for rank in range(self.nodes.count):
            if rank != self.nodes.rank:
                self._compare(rank)

    def merge(self, staging: Path, split: str) -> None:
        """Move every node's chunks of `split` into `staging/split` and list them in one `index.json`, node by node
        (each node's `{rank}-index.json` lists its workers' chunks in worker order, so the items stay in unit order)."""
        target = staging / split
        target.mkdir()
        chunks: list[dict[str, Any]] = []
        config = None
        for rank in range(self.nodes.count):
            part = self.reports / str(rank) / split
            index = json.loads((part / f"{rank}-index.json").read_text())
            if index.get("config") is not None:
                if config is None:
                    config = index["config"]
                elif _config_body(config) != _config_body(index["config"]):
                    raise _prepare_error(f"{split}: node {rank}'s shards are not laid out as node 0's; rerun prepare")
            for chunk in index["chunks"]:
                os.replace(part / chunk["filename"], target / chunk["filename"])
            chunks.extend(index["chunks"])
        merged = {"chunks": chunks, "config": config, "updated_at": str(time.time())}
        (target / "index.json").write_text(json.dumps(merged, sort_keys=True))

    def _compare(self, rank: int) -> None:
        theirs = _read_json(self.reports / str(rank) / IDENTITY)
        if theirs is None:
            raise _prepare_error(f"node {rank} of {self.nodes.count} left no {IDENTITY} in {self.staging}")
        ours = self.record
        for key in sorted(ours["identity"]):
            if theirs["identity"].get(key) != ours["identity"][key]:
                raise DataError(
                    f"node {rank} was started with {key} {theirs['identity'].get(key)!r}, node {self.nodes.rank} "
                    f"with {ours['identity'][key]!r}; every node must pass the same arguments"
                )
        if theirs["units"] != ours["units"]:
            raise DataError(
                f"node {rank} ({theirs.get('host')}) found {len(theirs['units'])} input files, node {self.nodes.rank} "
                f"found {len(ours['units'])}; every node must see the same inputs (a shared file system)"
            )


def write_splits(
    make_fn: Callable[[Path, Path], Callable[[int], Iterator[Any]]],
    make_val_fn: Callable[[Path], Callable[[int], Iterator[Any]]],
    num_units: int,
    staging: Path,
    *,
    val: bool,
    check: Callable[[list[dict[str, Any]]], None],
    what: str,
    workers: int,
    shards: dict[str, Any],
    progress: bool,
    run: NodeRun | None = None,
) -> list[dict[str, Any]] | None:
    """Write `staging/train` (and `staging/val`) from units 0..num_units-1 and return the units' final reports, in
    unit order; `check(reports)` raises for splits it refuses (before the val split is written, on one node).

    `make_fn(stats_dir, val_dir)` is the litdata function of a unit (reports to `stats_dir`, validation items to
    `val_dir/<unit>.*`), `make_val_fn(val_dir)` the one that yields a unit's saved validation items. With `run`
    (more than one node) this node writes its share into its own folder; the other nodes return None after it, the
    last one waits for them all and merges (see the module docstring)."""
    from moxin_lightning.data.progress import Progress
    from moxin_lightning.data.shards import write_shards

    nodes = run.nodes if run is not None else Nodes()
    work = staging / ".work"
    stats_dir, val_dir = work / "stats", work / "val"
    stats_dir.mkdir(parents=True, exist_ok=True)
    val_dir.mkdir(exist_ok=True)
    home = run.folder if run is not None else staging  # where litdata writes this node's splits
    shards = {**shards, "cache_dir": (run.folder if run is not None else work) / "litdata"}
    shards.update(num_nodes=nodes.count, node_rank=nodes.rank)
    monitor = Progress(stats_dir, num_units) if progress else None
    try:
        write_shards(make_fn(stats_dir, val_dir), num_units, home / "train", num_workers=workers, **shards)
    finally:
        if monitor is not None:
            monitor.stop()
    if run is None:
        reports = finished_reports(stats_dir, num_units, what)
        check(reports)
        if val:
            write_shards(make_val_fn(val_dir), num_units, staging / "val", num_workers=1, **shards)
        return reports
    raise_worker_errors(stats_dir, stopped=True)
    if val:  # the same units x nodes x workers mapping as train: this node's units, whose val files it wrote
        write_shards(make_val_fn(val_dir), num_units, home / "val", num_workers=workers, **shards)
    run.finish()
    if not nodes.last:
        return None
    done = run.wait()
    raise_worker_errors(stats_dir)  # a worker's error, as one node reports it, before "node r failed: ..."
    run.check_nodes(done)
    reports = finished_reports(stats_dir, num_units, what, wait=REPORTS_WAIT_SECONDS)
    check(reports)
    for split in ("train", "val") if val else ("train",):
        run.merge(staging, split)
    return reports


def raise_worker_errors(stats_dir: Path, stopped: bool = False) -> None:
    """The workers' first error as one line: DataError for bad data, PrepareError for a failure. `stopped`: also
    when the workers were stopped without one (a node other than the last, stopped by the failing last node)."""
    from moxin_lightning.data.worker import failed, read_reports

    errors = read_reports(stats_dir, "error")
    if errors:
        if errors[0]["data_error"]:
            raise DataError(errors[0]["message"])
        raise _prepare_error(errors[0]["message"], errors[0]["traceback"])
    if stopped and failed(stats_dir):
        raise _prepare_error("stopped: another node failed; the last node reports why")


def finished_reports(stats_dir: Path, num_units: int, what: str, wait: float = 0.0) -> list[dict[str, Any]]:
    """Every unit's final report, in unit order, after `raise_worker_errors`. `wait`: seconds to keep looking for
    missing ones (NFS may list a directory from its cache for a while after another node wrote to it)."""
    from moxin_lightning.data.worker import read_reports

    deadline = time.monotonic() + wait
    while True:
        raise_worker_errors(stats_dir)
        reports = [report for report in read_reports(stats_dir) if report["done"]]
        if [report["unit"] for report in reports] == list(range(num_units)):
            return reports
        if time.monotonic() >= deadline:
            raise _prepare_error(f"only {len(reports)} of {num_units} {what} were finished; rerun prepare")
        time.sleep(1.0)


def _config_body(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key != "types"}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with written_file(path) as temporary:
        temporary.write_text(json.dumps(value))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _prepare_error(message: str, details: str = "") -> Exception:
    from moxin_lightning.data.prepare import PrepareError  # prepare.py imports this module

    return PrepareError(message, details)
