"""`prepare`: documents -> litdata token shards + `manifest.json`, written all at once or not at all.

    python -m moxin_lightning prepare --input 'corpus/*.jsonl.gz' --tokenizer tokenizer.model --output data/c1
    python -m moxin_lightning prepare --input builtin:prose?max_mb=2 --tokenizer tok.model --output data/demo

Output layout: `OUTPUT/train/` and `OUTPUT/val/` are litdata datasets (`index.json` + `chunk-*.bin`, int32
tokens, one item per document) for `StreamingDataset(dir)`, or with `layout="tokens"` for
`StreamingDataset(dir, item_loader=TokensLoader(block_size=n))` (see `shards.py`); `OUTPUT/manifest.json`
says what they hold (see `manifest.py`). Each document becomes BOS + `tokenizer.encode(text)` + EOS, and documents
follow each other in input order: inputs as given, files of a glob sorted, records in file order.
With `val_fraction=0` there is no `val/`.

Steps: expand the inputs into sources (`sources.py`, `builtin.py`); read the first documents (text only) to check
the split before any work (`_scan_documents`: at least 2 documents when val_fraction > 0, and at least one held out:
when the hash rule picks none, the document with the smallest hash); read and tokenize every source once in
`num_workers` litdata workers (one source = one unit of work, so parallelism is across files: shard a big
corpus into many files), training documents streaming into `train/` and each source's validation documents
(`worker.is_validation`) saved aside; then write those into `val/`, hash both token streams, and write the
manifest.

Nothing half-written: everything goes to a hidden sibling folder `.OUTPUT.tmp-<pid>-<id>`, renamed to OUTPUT
only when complete; an existing dataset at OUTPUT is replaced (with `overwrite=True`) only then. A run that
dies leaves OUTPUT untouched; a temp folder left by a killed run is removed by the next `prepare` of the same
OUTPUT once its process is gone.

Across nodes (`num_nodes` > 1, one process per node, every node passing the same arguments and the same
`--num_workers`): litdata gives each node its share of the units, every node writes into one staging folder on a
file system they all mount, and the last node writes the manifest and publishes; the token streams and the
fingerprint are the single-node run's. See `nodes.py`.

This module does not import Lightning.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import importlib
import os
import platform
import shutil
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moxin_lightning.data import manifest as manifests
from moxin_lightning.data.builtin import local_parts
from moxin_lightning.data.integrity import chunk_hashes
from moxin_lightning.data.nodes import NodeRun, Nodes, resolve_nodes, write_splits
from moxin_lightning.data.prepare_records import FORMATS, encode_records, make_format, plan_units, scan_records
from moxin_lightning.data.publish import check_output, publish, remove_stale_temporaries, staging_folder
from moxin_lightning.data.records import reasons
from moxin_lightning.data.shards import DTYPE, LAYOUTS, count_items, read_tokens
from moxin_lightning.data.sources import MISSING_KEY, DataError, Source, SourceStats, expand_input, refuse_repeats
from moxin_lightning.data.worker import (
    SPLIT_RULE,
    SplitItem,
    SplitScan,
    TokenizeUnits,
    ValTokens,
    announce_forced,
    hash_in_val,
    lone_item_error,
    scan_split,
    split_hash,
    split_section,
)
from moxin_lightning.tokenizers.base import Tokenizer
from moxin_lightning.tokenizers.chat import ChatTemplate
from moxin_lightning.tokenizers.load import load_tokenizer

TOKENIZER_FOLDER = "tokenizer"
DOCUMENT_FORMAT = "BOS + tokenizer.encode(text) + EOS per document; documents back to back in input order"
DEFAULT_CHUNK_BYTES = "64MB"
# errno values that mean the output cannot take the data (disk or quota full, file-size limit, read-only, I/O)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO})
READ_WITH = {
    "documents": "litdata.StreamingDataset(dir): one int32 array per document",
    "tokens": "litdata.StreamingDataset(dir, item_loader=litdata.TokensLoader(block_size=n)): blocks of n tokens",
}


class PrepareError(RuntimeError):
    """A worker failed (e.g. the tokenizer raised); the message is one line naming the documents.

    `details` holds the worker's traceback, for debugging a tokenizer."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


def prepare(
    inputs: Sequence[str],
    tokenizer: Tokenizer | str | Path,
    output: str | Path,
    *,
    text_key: str = "text",
    num_workers: int | None = None,
    val_fraction: float = 0.005,
    overwrite: bool = False,
    seed: int = 0,
    layout: str = "documents",
    chunk_bytes: int | str = DEFAULT_CHUNK_BYTES,
    progress: bool = False,
    start_method: str | None = None,
    format: str = "documents",
    template: ChatTemplate | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    instruction: str | None = None,
    truncation: str | None = None,
    reasoning_markers: str | None = None,
    num_nodes: int = 1,
    node_rank: int = 0,
    shared_dir: str | Path | None = None,
) -> Path | str | None:
    """Tokenize `inputs` into `output` (train/, val/, manifest.json) and return `output` as a Path (a URL: as given).

    `tokenizer` is a `Tokenizer`, the path of a SentencePiece `tokenizer.model` (or its folder), or a folder
    written by `MoETokenizer.save`.
    `num_workers` defaults to the CPUs this process may use (0 means 1). `seed` salts the val split's hash.
    With `val_fraction` > 0 at least one document is held out: when the hash rule picks none, the one with the
    smallest hash (found by a text-only pre-pass, recorded as the manifest's `split.forced_val`); a single
    document, or none, is refused before any tokenizing.
    `layout` is "documents" (one document per litdata item, read by `StreamingDataset(dir)` and by
    `moxin_lightning.datamodules.PretrainData`) or "tokens" (`TokensLoader`); see `shards.py`. Raises
    DataError (bad inputs), FileExistsError (OUTPUT holds a dataset and `overwrite` is False, or holds other
    files) or PrepareError (a worker failed), each with a one-line message, before OUTPUT is touched.

    `format` "chat", "preference" or "prompts" prepares instruction records instead of documents (see
    `prepare_records.py`), encoded with `template` (default Tülu's) and cut to `max_length` tokens (prompts: longer
    than `max_prompt_length` skipped, `instruction` appended to file records' prompts; preference pairs cut by
    `truncation`, `prompt_first` by default or `right`; chat replies' reasoning markers as written, or with
    `reasoning_markers="think"` OpenThoughts' rewritten into `<think> ... </think>`, see `chat_records`).

    `num_nodes` > 1: this process is node `node_rank` of a multi-node run (see `nodes.py`): `output` must be on a
    file system every node mounts (an object-store URL: built in `shared_dir`, which must be) and `num_workers`
    given. Only the last node (`num_nodes - 1`) returns `output`; the others return None once their part is done.
    The environment is not read here (a datamodule preparing on first use inside a multi-node training job is one
    node's work); the command line reads it (`nodes.resolve_nodes`).
    """
    nodes = Nodes(num_nodes, node_rank)
    if nodes.count > 1 and num_workers is None:
        raise DataError(
            f"--num_nodes {nodes.count} needs --num_workers, the same on every node (litdata maps the inputs to "
            "nodes x workers); its default, the CPUs of each node, may differ between nodes"
        )
    tokenizer = _load_tokenizer(tokenizer)
    record_format = make_format(
        format, tokenizer, template, max_length, max_prompt_length, instruction, truncation, reasoning_markers
    )
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    val_fraction = float(val_fraction)  # the manifest (so the fingerprint) holds 0.0 whether 0 or 0.0 was passed
    if layout not in LAYOUTS:
        raise DataError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    destination = str(output)  # a local folder, or an object-store URL: built locally, then uploaded (remote.py)
    if "://" in destination and nodes.count > 1:
        output = _shared_build_folder(destination, shared_dir, overwrite, nodes)
    elif "://" in destination:
        from moxin_lightning.data.remote import staging_for

        output = staging_for(destination, overwrite)  # refuses a dataset already there, before any tokenizing
    output = Path(output).expanduser().absolute()
    if "://" not in destination or nodes.count == 1:
        check_output(output, overwrite)
    if record_format is None:
        groups, sources = _plan(inputs, text_key)
        scan = _scan_documents(sources, val_fraction, seed)
        announce_forced(scan, val_fraction, "documents")
    else:
        units = plan_units(record_format, [inputs] if isinstance(inputs, str) else list(inputs))
        scan = scan_records(record_format, units, val_fraction, seed)
        announce_forced(scan, val_fraction, f"{record_format.name} records")
    workers = num_workers if num_workers is not None else _available_cpus()

    output.parent.mkdir(parents=True, exist_ok=True)
    run = None
    if nodes.count == 1:
        remove_stale_temporaries(output)
        staging = staging_folder(output)
    else:
        identity = {
            "inputs": [inputs] if isinstance(inputs, str) else [str(given) for given in inputs],
            "tokenizer": tokenizer.fingerprint,
            "format": record_format.describe() if record_format is not None else format,
            "text_key": text_key,
            "layout": layout,
            "chunk_bytes": chunk_bytes,
            "val_fraction": val_fraction,
            "seed": seed,
            "num_nodes": nodes.count,
            "num_workers": workers,
        }
        found = [source.path for source in sources] if record_format is None else units
        run = NodeRun(output, nodes, identity, found)
        staging = run.staging
    try:
        if run is not None:
            run.start()
        shards = {"layout": layout, "chunk_bytes": chunk_bytes, "start_method": start_method}
        if record_format is None:
            reports = _tokenize(sources, tokenizer, staging, val_fraction, seed, scan, workers, shards, progress, run)
            if reports is None:  # another node than the last: its part is done
                return None
            _warn_unused_files(reports, text_key)
            section = split_section(val_fraction, seed, SPLIT_RULE, scan)
            body = _manifest_body(tokenizer, groups, reports, staging, section, text_key, layout)
        else:
            body = encode_records(
                record_format,
                units,
                staging,
                val_fraction=val_fraction,
                seed=seed,
                workers=workers,
                shards=shards,
                progress=progress,
                run=run,
                scan=scan,
            )
            if body is None:  # another node than the last: its part is done
                return None
            body = {"tokenizer": _tokenizer_entry(tokenizer), **body}
        shutil.rmtree(staging / ".work")
        (staging / TOKENIZER_FOLDER).mkdir()
        tokenizer.save(staging / TOKENIZER_FOLDER)  # the data carries its tokenizer: training and releases use it
        manifests.write(staging, manifests.build(body))
        # a multi-node build folder for a URL is this command's own: what an interrupted upload left there goes
        publish(staging, output, overwrite or ("://" in destination and nodes.count > 1))
        if "://" in destination:  # the finished folder goes up, manifest.json last; the local copy is deleted
            from moxin_lightning.data.remote import publish_remote

            return publish_remote(output, destination, overwrite)
    except BaseException as error:
        if run is None:
            shutil.rmtree(staging, ignore_errors=True)
        else:  # the other nodes need this node's report; the last node deletes the staging folder
            run.fail(error, staging / ".work" / "stats")
        if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
            raise PrepareError(
                f"writing {destination} failed: {error.strerror or error} ({errno.errorcode[error.errno]}); "
                "nothing was written there: make room on its file system (or lift the file-size limit) and run "
                "prepare again"
            ) from None
        raise
    return output


def _warn_unused_files(reports: list[dict[str, Any]], text_key: str) -> None:
    """A warning line on the console for each file none of whose records has the text field: its records are all
    skipped (and counted in the manifest), which is almost always a wrong --text_key rather than intended."""
    for report in reports:
        source = report["source"]
        if source["documents"] == 0 and set(source["skipped"]) == {MISSING_KEY}:
            print(
                f"prepare: warning: {source['path']}: all {source['skipped'][MISSING_KEY]:,} records lack the text "
                f"field {text_key!r}, so the file adds no documents; pass --text_key FIELD naming its text field",
                file=sys.stderr,
                flush=True,
            )


def _tokenize(
    sources: list[Source],
    tokenizer: Tokenizer,
    staging: Path,
    val_fraction: float,
    seed: int,
    scan: SplitScan,
    workers: int,
    shards: dict[str, Any],
    progress: bool,
    run: NodeRun | None = None,
) -> list[dict[str, Any]] | None:
    """Write staging/train (and staging/val); return the workers' per-source reports, in source order (None on a
    node other than the last of a multi-node `run`). The workers hold out `scan.forced` too (`_scan_documents`)."""
    return write_splits(
        lambda stats_dir, val_dir: TokenizeUnits(
            sources, tokenizer, val_fraction, seed, stats_dir, val_dir, scan.forced
        ),
        ValTokens,
        len(sources),
        staging,
        val=val_fraction > 0,
        check=lambda reports: _check_splits(reports, val_fraction),
        what="sources",
        workers=workers,
        shards=shards,
        progress=progress,
        run=run,
    )


def _shared_build_folder(url: str, shared_dir: str | Path | None, overwrite: bool, nodes: Nodes) -> Path:
    """Where the nodes of a multi-node run build the dataset for an object-store `url` (checked first, on every
    node): a folder named after the URL in `shared_dir`, which every node mounts; the last node uploads it."""
    if shared_dir is None:
        raise DataError(
            f"--output {url} with --num_nodes {nodes.count} needs --shared_dir: a folder every node mounts, where the "
            "nodes build the dataset before the last one uploads it (or --output a shared folder, and upload later)"
        )
    from moxin_lightning.data.remote import check_remote_output

    check_remote_output(url, overwrite)
    return Path(shared_dir).expanduser().absolute() / f"upload-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def _plan(inputs: Sequence[str], text_key: str) -> tuple[list[tuple[str, list[int]]], list[Source]]:
    """All sources in order, and the manifest entries they form: (input, units), one per file or builtin input."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise DataError("no --input given; pass files, globs, URLs or builtin:local / builtin:code / builtin:prose")
    groups: list[tuple[str, list[int]]] = []
    sources: list[Source] = []
    for spec in [one for given in inputs for one in local_parts(given)]:  # builtin:local = code + prose sources
        expanded = expand_input(spec, text_key)
        if not expanded:
            raise DataError(f"--input {spec} holds no documents (a cap of 0, or an empty corpus)")
        refuse_repeats([source.path for source in sources], [source.path for source in expanded])
        units = list(range(len(sources), len(sources) + len(expanded)))
        sources.extend(expanded)
        if spec.startswith("builtin:"):
            groups.append((spec, units))
        else:
            groups.extend((spec, [unit]) for unit in units)
    return groups, sources


def _scan_documents(sources: list[Source], val_fraction: float, seed: int) -> SplitScan:
    """The split pre-pass (`worker.scan_split`) over the documents' text, before any tokenizing: refuses inputs with
    no document (the message the finished run would give) and a val split of a single document, and finds the
    document to hold out when the hash rule picks none."""
    skipped: Counter = Counter()
    scan = scan_split(_split_items(sources, val_fraction, seed, skipped), val=val_fraction > 0)
    if scan.items == 0:
        raise _no_documents(skipped)
    if scan.lone:
        raise lone_item_error(val_fraction, "document", "--val_fraction")
    return scan


def _split_items(sources: list[Source], val_fraction: float, seed: int, skipped: Counter) -> Iterator[SplitItem]:
    """The documents in input order, as the split sees them; records that are no document counted in `skipped`.
    Reading fails as in a worker: a DataError's own line, anything else as a PrepareError naming the source."""
    for source in sources:
        try:
            for record in source.read(SourceStats(source.label, source.path)):
                if record.text is None:
                    skipped[record.skip] += 1
                    continue
                value = split_hash(record.text, seed)
                yield SplitItem(value, hash_in_val(value, val_fraction), record.where)
        except DataError:
            raise
        except Exception as error:
            first = (str(error).strip().splitlines() or [""])[0]
            raise PrepareError(f"reading {source.path} failed: {type(error).__name__}: {first}".rstrip(": ")) from None


def _no_documents(skipped: dict[str, int]) -> DataError:
    """The one-line error for inputs without a document, with every skip reason counted."""
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items())) or "no records"
    return DataError(f"the inputs hold no documents ({reasons}); check --input and --text_key")


def _check_splits(reports: list[dict[str, Any]], val_fraction: float) -> None:
    """One-line errors for no documents at all, or a split left empty by the val fraction (the pre-pass refuses
    both before the work; these hold should the inputs change while they are read)."""
    documents = sum(report["source"]["documents"] for report in reports)
    in_val = sum(report["val"]["documents"] for report in reports)
    if documents == 0:
        skipped: Counter = Counter()
        for report in reports:
            skipped.update(report["source"]["skipped"])
        raise _no_documents(skipped)
    if val_fraction > 0 and in_val == 0:
        raise DataError(
            f"val_fraction {val_fraction} picked none of the {documents} documents; "
            "raise --val_fraction, or pass --val_fraction 0 for no val split"
        )
    if in_val == documents:
        raise DataError(f"val_fraction {val_fraction} put all {documents} documents in val; lower --val_fraction")


def _manifest_body(tokenizer, groups, reports, staging, section, text_key, layout) -> dict[str, Any]:
    """Everything the manifest says, from the workers' reports and the written shards; `section`: its `split`."""
    names = [name for name in manifests.SPLITS if (staging / name).is_dir()]
    splits = {name: _split_entry(staging / name, [report[name] for report in reports]) for name in names}
    return {
        "tokenizer": _tokenizer_entry(tokenizer),
        "dtype": DTYPE.__name__,
        "document": DOCUMENT_FORMAT,
        "layout": layout,
        "read_with": READ_WITH[layout],
        "split": section,
        "splits": splits,
        "documents": sum(split["documents"] for split in splits.values()),
        "tokens": sum(split["tokens"] for split in splits.values()),
        "text_key": text_key,
        "sources": [_source_entry(spec, [reports[unit]["source"] for unit in units]) for spec, units in groups],
    }


def _tokenizer_entry(tokenizer: Tokenizer) -> dict[str, Any]:
    return {
        "fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "path": str(getattr(tokenizer, "path", "")),
        "saved": TOKENIZER_FOLDER,
    }


def _split_entry(folder: Path, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and the sha256 of the int32 token stream, read back through litdata and checked against the workers'
    counts, so a manifest only ever describes shards that read back as what was tokenized."""
    digest = hashlib.sha256()
    tokens = 0
    for piece in read_tokens(folder):
        digest.update(np.ascontiguousarray(piece, dtype="<i4"))  # no bytes copy
        tokens += piece.size
    entry = {
        "path": folder.name,
        "documents": sum(report["documents"] for report in reports),
        "tokens": sum(report["tokens"] for report in reports),
        "chunks": len(list(folder.glob("chunk-*.bin"))),
        "sha256": digest.hexdigest(),
        "chunk_sha256": chunk_hashes(folder),  # `verify` names the chunk whose bytes changed
    }
    if (count_items(folder), tokens) != (entry["documents"], entry["tokens"]):
        raise PrepareError(
            f"{folder.name}: litdata holds {count_items(folder)} documents / {tokens} tokens, the workers made "
            f"{entry['documents']} / {entry['tokens']}; rerun prepare"
        )
    return entry


def _source_entry(spec: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One manifest entry: a file as read, or a builtin input summed over its parts.

    A builtin input's sha256 is the sha256 of its parts' hex digests, each followed by a newline (what
    `builtin.corpus_fingerprint` computes), and its text depends on the Python version, which is recorded."""
    if len(parts) == 1 and not spec.startswith("builtin:"):
        return {"input": spec, **parts[0]}
    skipped: dict[str, int] = {}
    for part in parts:
        for reason, count in part["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    return {
        "input": spec,
        "path": spec,
        **({"python": platform.python_version()} if spec.startswith("builtin:") else {}),
        "parts": len(parts),
        "bytes": sum(part["bytes"] for part in parts),
        "sha256": hashlib.sha256("".join(part["sha256"] + "\n" for part in parts).encode()).hexdigest(),
        "documents": sum(part["documents"] for part in parts),
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": [example for part in parts for example in part["skipped_examples"]][:5],
    }


def _load_tokenizer(tokenizer: Tokenizer | str | Path) -> Tokenizer:
    """A path is a MoE tokenizer folder (it holds the MoE layout file) or a SentencePiece model or its folder."""
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
        raise DataError("the tokenizer has no BOS or EOS token; prepare frames every document with both")
    if tokenizer.vocab_size > 2**31 - 1:
        raise DataError(f"vocab_size {tokenizer.vocab_size} does not fit the int32 shards")
    return tokenizer


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `prepare` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "prepare",
        help="tokenize documents into litdata shards + manifest.json",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="PATH_OR_GLOB",
        help="a .txt / .jsonl[.gz|.bz2|.xz|.zst] / .parquet file, glob, folder or fsspec URL, or builtin:local "
        "(= builtin:code + builtin:prose; caps: builtin:local?max_mb=2&max_documents=100); repeat for more",
    )
    parser.add_argument(
        "--tokenizer", required=True, help="a SentencePiece tokenizer.model or its folder, or a MoE tokenizer folder"
    )
    parser.add_argument("--output", required=True, help="the dataset folder to create (train/, val/, manifest.json)")
    parser.add_argument("--text_key", default="text", help="the JSON field / parquet column holding the text")
    parser.add_argument("--num_workers", type=int, default=None, help="worker processes (default: all CPUs)")
    parser.add_argument("--val_fraction", type=float, default=0.005, help="share of documents for val/ (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="salts the hash that picks the val documents")
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="documents",
        help="documents: one litdata item per document (what PretrainData reads); tokens: for TokensLoader",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already at --output")
    records = parser.add_argument_group("instruction records (--format chat | preference | prompts)")
    records.add_argument(
        "--format",
        choices=FORMATS,
        default="documents",
        help="documents (pretraining text) or the records SFT (chat), DPO (preference) or GRPO (prompts) read",
    )
    records.add_argument(
        "--template",
        default=None,
        help="chat template: a class path (default moxin_lightning.tokenizers.TuluTemplate, the Tülu layout)",
    )
    records.add_argument("--max_length", type=int, default=None, help="chat/preference: tokens per sequence")
    records.add_argument(
        "--max_prompt_length", type=int, default=None, help="prompts: longest prompt in tokens (longer: skipped)"
    )
    records.add_argument("--instruction", default=None, help="prompts: text appended to every file record's prompt")
    records.add_argument(
        "--truncation",
        default=None,
        help="preference: how a pair beyond --max_length is cut: prompt_first (default: the prompt from the left, "
        "then the responses) or right (each whole sequence from the right, as Moxin's DPO did)",
    )
    records.add_argument(
        "--reasoning_markers",
        default=None,
        help="chat: keep (default: replies as written) or think (OpenThoughts' <|begin_of_thought|> ... "
        "<|end_of_thought|> rewritten as <think> ... </think>, its solution markers and the system prompt asking "
        "for them dropped: the GRPO reward that follows reads </think>)",
    )
    nodes = parser.add_argument_group(
        "across nodes (one process per node, same arguments on every node, --output on a file system all mount)"
    )
    nodes.add_argument(
        "--num_nodes",
        type=int,
        default=None,
        help="nodes preparing this dataset together (default: DATA_OPTIMIZER_NUM_NODES, an srun step's tasks with "
        "one per node, torchrun's WORLD_SIZE with --nproc_per_node 1, else 1); needs --num_workers",
    )
    nodes.add_argument(
        "--node_rank",
        type=int,
        default=None,
        help="this node, 0 .. num_nodes-1; the last one writes manifest.json (default: DATA_OPTIMIZER_NODE_RANK, "
        "SLURM_PROCID, torchrun's GROUP_RANK)",
    )
    nodes.add_argument(
        "--shared_dir",
        default=None,
        help="with an object-store --output: a folder every node mounts, to build the dataset in before the last "
        "node uploads it",
    )
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> None:
    try:
        nodes = resolve_nodes(args.num_nodes, args.node_rank)
        output = prepare(
            args.input,
            args.tokenizer,
            args.output,
            text_key=args.text_key,
            num_workers=args.num_workers,
            val_fraction=args.val_fraction,
            overwrite=args.overwrite,
            seed=args.seed,
            layout=args.layout,
            progress=True,
            format=args.format,
            template=_template(args.template),
            max_length=args.max_length,
            max_prompt_length=args.max_prompt_length,
            instruction=args.instruction,
            truncation=args.truncation,
            reasoning_markers=args.reasoning_markers,
            num_nodes=nodes.count,
            node_rank=nodes.rank,
            shared_dir=args.shared_dir,
        )
    except (DataError, PrepareError, OSError, ValueError) as error:
        raise SystemExit(f"prepare: error: {error}") from None
    if output is None:
        print(
            f"prepare: node {nodes.rank} of {nodes.count} finished its part of {args.output}; "
            f"the last node ({nodes.count - 1}) writes manifest.json once every node is done"
        )
        return
    manifest = manifests.read(output)
    unit = "documents" if args.format == "documents" else "records"
    splits = ", ".join(
        f"{name} {split[unit]:,} {unit} / {split['tokens']:,} tokens" for name, split in manifest["splits"].items()
    )
    print(f"prepared {output}: {splits}; fingerprint {manifest['fingerprint']}")
    if manifest.get("skipped"):
        print(f"skipped {sum(manifest['skipped'].values()):,} records: {reasons(manifest['skipped'])}")


def _template(class_path: str | None) -> ChatTemplate | None:
    """The chat template a class path names (instantiated without arguments); DataError when it names none."""
    if class_path is None:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        template = getattr(importlib.import_module(module), name)()
    except (ImportError, AttributeError, ValueError, TypeError) as error:
        raise DataError(f"--template {class_path} is not a chat template class path ({error})") from None
    if not isinstance(template, ChatTemplate):
        raise DataError(f"--template {class_path} has no name and encode(); pass a ChatTemplate class path")
    return template
