"""`prepare --format chat|preference|prompts`: instruction records -> litdata shards of items + `manifest.json`.

    python -m moxin_lightning prepare --format chat --input 'tulu-3-sft-mixture/data/*.parquet' \\
        --tokenizer runs/phase3/release/tokenizer.model --max_length 4096 --output data/tulu-3-sft-mixture

The layout is the one `prepare` writes for documents (`train/`, `val/` when `val_fraction` > 0, `tokenizer/`,
`manifest.json`), written atomically the same way; the items are the format's (see `chat_records`,
`preference_records`, `prompt_records`), one per usable record, in input order. The manifest adds what the items
depend on (`records`: format, template name and fingerprint, `max_length` or `max_prompt_length`, instruction,
truncation rule, reasoning markers) and, per split, the records, tokens, trained tokens, truncated records and
every skip by reason; the datamodules check those against their own settings before any work.

The split rounds up as the documents' does (`scan_records`, before any work): with `val_fraction` > 0 at least one
usable record is held out (the one with the smallest hash when the hash rule holds out none), and a single usable
record, or none that parses, is refused.

Called by `prepare.prepare` (which owns the output folder) and by the datamodules, which prepare raw files named
in their `train` / `val` on first use through this same code.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moxin_lightning.data.chat_records import REASONING_MARKERS, ChatFormat
from moxin_lightning.data.integrity import chunk_hashes
from moxin_lightning.data.nodes import NodeRun, write_splits
from moxin_lightning.data.preference_records import TRUNCATIONS, PreferenceFormat
from moxin_lightning.data.prompt_records import PromptFormat
from moxin_lightning.data.record_worker import EncodeRecords, ValItems
from moxin_lightning.data.records import (
    RECORD_SPLIT_RULE,
    Encoded,
    RecordFormat,
    SplitCounts,
    hash_held_out,
    reasons,
    record_hash,
)
from moxin_lightning.data.shards import count_items
from moxin_lightning.data.sources import DataError, refuse_repeats
from moxin_lightning.data.worker import SplitItem, SplitScan, lone_item_error, scan_split, split_section
from moxin_lightning.tokenizers.base import Tokenizer
from moxin_lightning.tokenizers.chat import TULU, ChatTemplate

RECORD_LAYOUT = "records"
# Defaults when --max_length / --max_prompt_length is not given: Moxin-Instruct's SFT and DPO lengths, and
# Moxin-Reasoning's prompt length.
DEFAULT_MAX_LENGTH = {"chat": 4096, "preference": 2048, "prompts": 1024}
ITEM_KEYS = {
    "chat": "ids (int32), trained (uint8)",
    "preference": "prompt, chosen, rejected (int32), chosen_trained, rejected_trained (uint8)",
    "prompts": "ids (int32), text (str), answer (str)",
}


FORMATS = ("documents", "chat", "preference", "prompts")


def make_format(
    name: str,
    tokenizer: Tokenizer,
    template: ChatTemplate | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    instruction: str | None = None,
    truncation: str | None = None,
    reasoning_markers: str | None = None,
) -> RecordFormat | None:
    """The record format `name` with its settings (None for documents); DataError for a setting it does not take."""
    if name not in FORMATS:
        raise DataError(f"--format {name!r} is not one of {', '.join(FORMATS)}")
    given = {
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "instruction": instruction,
        "truncation": truncation,
        "reasoning_markers": reasoning_markers,
    }
    takes = {
        "documents": (),
        "chat": ("max_length", "reasoning_markers"),
        "preference": ("max_length", "truncation"),
    }.get(name, ("max_prompt_length", "instruction"))
    extra = [key for key, value in given.items() if value is not None and key not in takes]
    if extra or (name == "documents" and template is not None):
        raise DataError(f"--{(extra or ['template'])[0]} does not apply to --format {name}; drop it")
    if name == "documents":
        return None
    template = template or TULU
    if name == "chat":
        if reasoning_markers is not None and reasoning_markers not in REASONING_MARKERS:
            raise DataError(f"--reasoning_markers {reasoning_markers!r} is not one of {', '.join(REASONING_MARKERS)}")
        return ChatFormat(tokenizer, template, max_length or DEFAULT_MAX_LENGTH["chat"], reasoning_markers or "keep")
    if name == "preference":
        if truncation is not None and truncation not in TRUNCATIONS:
            raise DataError(f"--truncation {truncation!r} is not one of {', '.join(TRUNCATIONS)}")
        length = max_length or DEFAULT_MAX_LENGTH["preference"]
        return PreferenceFormat(tokenizer, template, length, truncation or "prompt_first")
    return PromptFormat(tokenizer, template, max_prompt_length or DEFAULT_MAX_LENGTH["prompts"], instruction)


def plan_units(record_format: RecordFormat, inputs: list[str]) -> list[str]:
    """Every unit of work the inputs name, in order; DataError (one line) for an input that names none, a file the
    format cannot read, or a file listed twice, before any work."""
    if not inputs:
        raise DataError("no --input given; pass files, globs, URLs or a built-in corpus")
    units: list[str] = []
    for spec in inputs:
        found = record_format.units(str(spec))
        if not found:
            raise DataError(f"--input {spec} holds no records")
        refuse_repeats(units, found)
        units.extend(found)
    return units


def scan_records(record_format: RecordFormat, units: list[str], val_fraction: float, seed: int) -> SplitScan:
    """The split pre-pass over the records (`worker.scan_split`), before any work: parsing only, plus encoding the
    few records that may be held out, since a record too long for the format's limits is skipped there. Refuses
    inputs with no parsable record (the message the finished run would give) and a val split of a single record."""

    def usable(parsed: Any) -> bool:
        return isinstance(record_format.encode_parsed([parsed])[0], Encoded)

    skipped: Counter = Counter()
    scan = scan_split(_split_items(record_format, units, val_fraction, seed, skipped), val_fraction > 0, usable)
    if scan.items == 0:
        raise _no_usable(record_format, units, skipped)
    if scan.lone:
        raise lone_item_error(val_fraction, f"usable {record_format.name} record", "val_fraction")
    return scan


def _split_items(
    record_format: RecordFormat, units: list[str], val_fraction: float, seed: int, skipped: Counter
) -> Iterator[SplitItem]:
    """The parsable records in input order, as the split sees them; unparsable ones are counted in `skipped` under
    the reasons the workers count them under."""
    for unit in units:
        for record in record_format.read(unit):
            parsed = record.skip if record.value is None else record_format.parse(record.value)
            if isinstance(parsed, str):
                skipped[parsed or "unreadable record"] += 1
                continue
            value = record_hash(record_format.split_key(parsed), seed)
            yield SplitItem(value, hash_held_out(value, val_fraction), record.where, parsed)


def encode_records(
    record_format: RecordFormat,
    units: list[str],
    staging: Path,
    *,
    val_fraction: float,
    seed: int,
    workers: int,
    shards: dict[str, Any],
    progress: bool,
    run: NodeRun | None = None,
    scan: SplitScan | None = None,
) -> dict[str, Any] | None:
    """Write staging/train (and staging/val) and return the manifest body's record-specific part; with `run` (more
    than one node), None on every node but the last (see `nodes.py`). `scan`: the split pre-pass's result
    (`scan_records`), whose forced hash, if any, is held out."""
    forced = scan.forced if scan is not None else None
    reports = write_splits(
        lambda stats_dir, val_dir: EncodeRecords(units, record_format, val_fraction, seed, stats_dir, val_dir, forced),
        ValItems,
        len(units),
        staging,
        val=val_fraction > 0,
        check=lambda reports: _check_splits(
            record_format, {split: _split_counts(reports, split) for split in ("train", "val")}, val_fraction, units
        ),
        what="inputs",
        workers=workers,
        shards={**shards, "layout": "documents"},
        progress=progress,
        run=run,
    )
    if reports is None:
        return None
    splits = {split: _split_counts(reports, split) for split in ("train", "val")}
    entries = {}
    for split in ("train", "val") if val_fraction > 0 else ("train",):
        counts, digest = splits[split]
        folder = staging / split
        entry = {"path": split, **counts.to_dict(), "chunks": len(list(folder.glob("chunk-*.bin"))), "sha256": digest}
        entry["chunk_sha256"] = chunk_hashes(folder)  # `verify` names the chunk whose bytes changed
        if count_items(folder) != counts.records:
            raise _prepare_error(
                f"{split}: litdata holds {count_items(folder)} items, the workers made {counts.records}"
            )
        entries[split] = entry
    skipped = Counter()
    for counts, _ in splits.values():
        skipped.update(counts.skipped)
    return {
        "records": record_format.describe(),
        "layout": RECORD_LAYOUT,
        "read_with": f"litdata.StreamingDataset(dir): one dict per record: {ITEM_KEYS[record_format.name]}",
        "split": split_section(val_fraction, seed, RECORD_SPLIT_RULE, scan),
        "splits": entries,
        "documents": sum(entry["records"] for entry in entries.values()),
        "tokens": sum(entry["tokens"] for entry in entries.values()),
        "skipped": dict(sorted(skipped.items())),
        "sources": [
            {
                "input": report["input"],
                "path": report["input"],
                "read": report["read"],
                "records": report["train"]["records"] + report["val"]["records"],
                "skipped": dict(
                    sorted((Counter(report["train"]["skipped"]) + Counter(report["val"]["skipped"])).items())
                ),
            }
            for report in reports
        ],
    }


def _split_counts(reports: list[dict[str, Any]], split: str) -> tuple[SplitCounts, str]:
    """A split's counts summed over the units, and the sha256 of the units' item digests in unit order."""
    counts, digest = SplitCounts(), hashlib.sha256()
    for report in reports:
        counts.add(report[split])
        digest.update(bytes.fromhex(report[split]["sha256"]))
    return counts, digest.hexdigest()


def _check_splits(record_format: RecordFormat, splits: dict[str, Any], val_fraction: float, units: list[str]) -> None:
    """One-line errors for a split left with no usable record, naming the inputs, what was skipped and why."""
    train, _ = splits["train"]
    val, _ = splits["val"]
    if train.records + val.records == 0:
        raise _no_usable(record_format, units, train.skipped + val.skipped)
    if val_fraction > 0 and train.records + val.records == 1:  # the pre-pass cannot see skips made while encoding
        raise lone_item_error(val_fraction, f"usable {record_format.name} record", "val_fraction")
    if val_fraction > 0 and val.records == 0:
        raise DataError(
            f"val_fraction {val_fraction} held out none of the {train.records} usable {record_format.name} records; "
            "raise val_fraction, or use 0 for no val split"
        )
    if train.records == 0:
        raise DataError(f"val_fraction {val_fraction} put all {val.records} records in val; lower val_fraction")


def _no_usable(record_format: RecordFormat, units: list[str], skipped: Counter) -> DataError:
    """The one-line error for inputs without a usable record, naming them, the settings and every skip reason."""
    settings = ", ".join(f"{key}={value}" for key, value in record_format.settings().items() if value is not None)
    inputs = ", ".join(units[:3]) + (f" and {len(units) - 3} more" if len(units) > 3 else "")
    length = next((key for key in record_format.settings() if key.startswith("max_")), None)
    fix = "check the records" + (f", or raise {length}" if length else "")
    listed = reasons(skipped) or "no records"
    return DataError(f"no usable {record_format.name} record in {inputs} at {settings} (skipped: {listed}); {fix}")


def _prepare_error(message: str, details: str = "") -> Exception:
    from moxin_lightning.data.prepare import PrepareError  # prepare.py imports this module

    return PrepareError(message, details)
