"""Instruction data at Tülu 3 scale: `prepare --format chat`, `ChatData.setup()` and its loader, on 100K and 1M
synthetic conversations written as Tülu 3 SFT parquet files.

The data (generated once per size and seed, cached under `--work`, default `$MOXIN_CACHE/bench/instruct_data`):
Tülu 3 SFT mixture files (`id`, `messages` list<struct<content, role>>, `source`), spread over several parquet
files like the published mixture. Each conversation has a system turn 30% of the time, then 1-4 user/assistant
exchanges (1: 70%, 2: 15%, 3: 9%, 4: 6%); user turns are tens to a few hundred words (log-normal, median 30,
5..500), assistant turns longer (log-normal, median 120, 15..1500 words; the longest are cut at `max_length`
when prepared). The text is real English: contiguous runs of the words of the pydoc topics and the standard
library's docstrings (the words that look like words; paragraph breaks after some sentences), at seeded random
places. The tokenizer is `LocalTokenizer` (4096 pieces, trained on first use, cached).

What is measured, per size:
  1. prepare: `prepare(..., format="chat", max_length=2048, val_fraction=0.002)` over the files with `num_workers`
     = the CPUs (reading parquet, the hash split, batched template encoding, shards, manifest: wall time), against
     the tokenizer's own batched encoder (`encode_batch`: sentencepiece's C++ loop and threads) over the same
     message texts, taken from the same files beforehand (reading not timed), in the same run. Ratio:
     conversations/s of prepare over the encoder's (goal >= 0.8x).
  2. setup: `ChatData([prepared folder], ...).setup()` of one rank, not attached to a trainer, in a fresh
     subprocess: wall seconds and resident memory before and after (goal <= 5 s, <= 300 MB, flat from 100K to 1M);
     beside it, in its own subprocess, the in-memory path ChatData had before the data was prepared
     (`old_setup`: reads and template-encodes every record into flat arrays, as at commit bbb7bcf).
  3. loader: tokens/s (rows x max_length, what a step computes on) from iterating
     `ChatData.train_dataloader()` (max_length 2048, pack, `--batch_size` conversations per batch, num_workers 0
     and 2), against the tokens/s of SFT training steps of moxin-tiny-9m (as `conf/sft-local.yaml` overrides it:
     the 4096-piece vocabulary, SDPA) on batches of that loader, timed under `Trainer.fit` like
     `bench/pretrain.py`. Ratio loader / step (goal >= 100x).

Each measurement appends one JSON line to `--out`; a table is printed at the end. Run (2 CPU cores):

    python bench/instruct_data.py --sizes 100000      # 2.3 min (5 on a shared machine); data made on first use
    python bench/instruct_data.py                     # 100K and 1M: 23 min, 7 of them the old setup at 1M
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the subprocesses import datamodules/ like the parent
    sys.path.insert(0, str(ROOT))

DATA_VERSION = 1  # bump when the generated conversations change
MAX_LENGTH = 2048
VAL_FRACTION = 0.002
ROWS_PER_FILE = 125_000  # about what each file of allenai/tulu-3-sft-mixture holds
EXCHANGES = ([1, 2, 3, 4], [0.70, 0.15, 0.09, 0.06])
SYSTEM_SHARE = 0.3
# (median words, log-normal sigma, least, most)
SYSTEM_WORDS = (15, 0.6, 4, 80)
USER_WORDS = (30, 1.0, 5, 500)
ASSISTANT_WORDS = (120, 0.8, 15, 1500)
SOURCES = (
    "ai2-adapt-dev/tulu_v3.9_wildchat_100k",
    "ai2-adapt-dev/personahub_math_v5_regen_149960",
    "ai2-adapt-dev/tulu_v3.9_aya_100k",
    "ai2-adapt-dev/flan_v2_converted",
    "ai2-adapt-dev/evol_codealpaca_heval_decontaminated",
    "ai2-adapt-dev/no_robots_converted",
)
WORD = re.compile(r"[A-Za-z][a-z'-]*[.,;:?!]?\Z")
GOALS = {"prepare_ratio": 0.8, "setup_s": 5.0, "setup_mb": 300.0, "loader_ratio": 100.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="conversations")
    parser.add_argument("--work", default=None, help="data and prepared folders (default $MOXIN_CACHE/bench/...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_workers", type=int, default=None, help="prepare's workers (default: the CPUs)")
    parser.add_argument("--batch_size", type=int, default=8, help="conversations per batch (conf/sft-local.yaml)")
    parser.add_argument("--loader_workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=2000, help="loader batches timed after the first")
    parser.add_argument("--steps", type=int, default=4, help="SFT steps timed (median) after --warmup")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--config", default=str(ROOT / "conf" / "sft-local.yaml"), help="model overrides")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "instruct_data.jsonl"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a setup measurement (JSON spec)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- the data


def corpus_words() -> tuple[str, np.ndarray, np.ndarray]:
    """The word stream the turns are cut from: the pydoc topics, then the docstrings of every standard-library
    module, keeping the whitespace-separated words that look like English words. Returns the text (words joined
    by a space, or by a blank line after 1 in 6 sentence ends), each word's start in it, and its end."""
    import sysconfig
    from pydoc_data.topics import topics

    from moxin_lightning.data.builtin import module_docstrings, python_files

    texts = [topics[key] for key in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    for relative, path in python_files(stdlib, skip_site=True):
        record = module_docstrings(relative, path)
        if record.text:
            texts.append(record.text)
    words = [word for text in texts for word in text.split() if WORD.match(word)]
    rng = np.random.default_rng(12345)
    ends_sentence = np.fromiter((word[-1] in ".?!" for word in words), dtype=bool, count=len(words))
    breaks = ends_sentence & (rng.random(len(words)) < 1 / 6)
    separators = np.where(breaks, 2, 1)
    lengths = np.fromiter((len(word) for word in words), dtype=np.int64, count=len(words))
    starts = np.concatenate([[0], np.cumsum(lengths + separators)[:-1]])
    text = "".join(word + ("\n\n" if brk else " ") for word, brk in zip(words, breaks, strict=True))
    return text, starts, starts + lengths


def word_counts(rng: np.random.Generator, count: int, shape: tuple[int, float, int, int]) -> np.ndarray:
    median, sigma, least, most = shape
    return np.clip(np.round(rng.lognormal(math.log(median), sigma, count)), least, most).astype(np.int64)


def write_file(path: Path, first_id: int, rows: int, rng: np.random.Generator, corpus: tuple) -> None:
    """`rows` conversations as one Tülu 3 SFT parquet file (id, messages, source)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text, starts, ends = corpus[0], corpus[1].tolist(), corpus[2].tolist()
    system = rng.random(rows) < SYSTEM_SHARE
    exchanges = rng.choice(EXCHANGES[0], rows, p=EXCHANGES[1])
    turns = int(system.sum() + 2 * exchanges.sum())
    roles, counts = [], []
    for has_system, pairs in zip(system.tolist(), exchanges.tolist(), strict=True):
        roles.extend((["system"] if has_system else []) + ["user", "assistant"] * pairs)
        counts.append(int(has_system) + 2 * pairs)
    role_array = np.asarray(roles)
    words = np.zeros(turns, dtype=np.int64)
    for role, shape in (("system", SYSTEM_WORDS), ("user", USER_WORDS), ("assistant", ASSISTANT_WORDS)):
        where = role_array == role
        words[where] = word_counts(rng, int(where.sum()), shape)
    first = rng.integers(0, len(starts) - words.max() - 1, turns)
    contents = [text[starts[a] : ends[a + n - 1]] for a, n in zip(first.tolist(), words.tolist(), strict=True)]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    fields = [pa.array(contents, pa.string()), pa.array(roles, pa.string())]
    messages = pa.ListArray.from_arrays(pa.array(offsets), pa.StructArray.from_arrays(fields, ["content", "role"]))
    ids = pa.array([f"synthetic_tulu_{first_id + index}" for index in range(rows)], pa.string())
    sources = pa.array(np.asarray(SOURCES)[rng.integers(0, len(SOURCES), rows)].tolist(), pa.string())
    pq.write_table(pa.table({"id": ids, "messages": messages, "source": sources}), path)


def dataset(work: Path, size: int, seed: int) -> tuple[Path, dict[str, Any]]:
    """The folder of `size` synthetic conversations (generated on first use) and what it holds."""
    folder = work / f"tulu3-synthetic-v{DATA_VERSION}-seed{seed}-{size}"
    done = folder / "done.json"
    if done.is_file():
        return folder, json.loads(done.read_text())
    start = time.perf_counter()
    corpus = corpus_words()
    staging = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    files = max(4, -(-size // ROWS_PER_FILE))
    bounds = [size * index // files for index in range(files + 1)]
    for index in range(files):
        rng = np.random.default_rng([seed, size, index])
        name = f"train-{index:05d}-of-{files:05d}.parquet"
        write_file(staging / name, bounds[index], bounds[index + 1] - bounds[index], rng, corpus)
    info = {
        "conversations": size,
        "files": files,
        "bytes": sum(path.stat().st_size for path in staging.glob("*.parquet")),
        "corpus_words": len(corpus[1]),
        "generate_s": time.perf_counter() - start,
    }
    (staging / "done.json").write_text(json.dumps(info))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder, info


def message_texts(path: Path) -> list[str]:
    """Every message's content of one parquet file, in order."""
    import pyarrow.parquet as pq

    messages = pq.read_table(path, columns=["messages"]).column("messages").combine_chunks()
    return messages.flatten().field("content").to_pylist()


# ------------------------------------------------------------------------------------- 1. prepare vs the encoder


def peer_encode(files: list[Path], tokenizer: Any, chunk: int = 16_384) -> tuple[float, int, int]:
    """(seconds, tokens, texts) of `tokenizer.encode_batch` over every message text of `files`, `chunk` texts per
    call (the texts of one file are read first, untimed; the ids are counted and dropped)."""
    seconds, tokens, texts = 0.0, 0, 0
    for path in files:
        contents = message_texts(path)
        start = time.perf_counter()
        for first in range(0, len(contents), chunk):
            tokens += sum(map(len, tokenizer.encode_batch(contents[first : first + chunk])))
        seconds += time.perf_counter() - start
        texts += len(contents)
    return seconds, tokens, texts


def run_prepare(data: Path, output: Path, tokenizer: Any, workers: int) -> tuple[float, dict[str, Any]]:
    from moxin_lightning.data import read_manifest
    from moxin_lightning.data.prepare import prepare

    start = time.perf_counter()
    prepare(
        [str(data / "*.parquet")],
        tokenizer,
        output,
        format="chat",
        max_length=MAX_LENGTH,
        val_fraction=VAL_FRACTION,
        num_workers=workers,
        overwrite=True,
    )
    return time.perf_counter() - start, read_manifest(output)


# ---------------------------------------------------------------------------------------------------- 2. setup


def old_setup(
    inputs: str, tokenizer: Any, max_length: int, val_fraction: float, seed: int = 42
) -> tuple[dict[str, Any], list[Any]]:
    """What `ChatData.setup()` did before instruction data was prepared (commit bbb7bcf, `datamodules/chat.py`),
    reproduced here because that code is gone: read every record of the files (`read_objects`), check it, pick
    its split by a hash of its messages, encode each conversation with `TuluTemplate().encode` (one tokenizer call
    per text piece), cut it to `max_length`, keep the ids and the assistant mask as flat int32 / bool arrays with
    offsets, and pack the training conversations into rows in a seeded order (`pack_rows`). Every process of a run
    did this, in memory. Returns the counts per split (to check against the prepared manifest) and what the
    datamodule held (the arrays and rows), which the caller keeps alive while it measures memory."""
    from moxin_lightning.data.chat_records import MESSAGES, messages_problem, trainable_tokens
    from moxin_lightning.data.sources import read_objects
    from moxin_lightning.tokenizers.chat import TuluTemplate

    template = TuluTemplate()
    splits = {
        split: {"tokens": [], "trained": [], "conversations": 0, "token_count": 0, "skipped": 0}
        for split in ("train", "val")
    }
    records = read_objects(
        inputs,
        (MESSAGES,),
        all_columns=False,
        not_text="{path} is a .txt file",
        missing="{path} has no column 'messages' (columns: {columns})",
    )
    for record in records:
        value = record.value
        if value is None or messages_problem(value.get(MESSAGES)):
            splits["train"]["skipped"] += 1
            continue
        messages = value[MESSAGES]
        text = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
        held = val_fraction > 0 and int.from_bytes(hashlib.sha256(text).digest()[:8], "big") / 2**64 < val_fraction
        split = splits["val" if held else "train"]
        ids, trained = template.encode(tokenizer, messages)
        ids, trained = ids[:max_length], trained[:max_length]
        if trainable_tokens(trained) == 0:
            split["skipped"] += 1  # counted under "no assistant token within max_length"
            continue
        split["tokens"].append(np.asarray(ids, dtype=np.int32))
        split["trained"].append(np.asarray(trained, dtype=bool))
        split["conversations"] += 1
        split["token_count"] += len(ids)
    result, held = {}, []
    for name, split in splits.items():
        lengths = np.fromiter((len(ids) for ids in split["tokens"]), dtype=np.int64, count=len(split["tokens"]))
        flat_tokens = np.concatenate(split.pop("tokens")) if lengths.size else np.zeros(0, np.int32)
        flat_trained = np.concatenate(split.pop("trained")) if lengths.size else np.zeros(0, bool)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        order = np.random.default_rng(seed).permutation(len(lengths)) if name == "train" else range(len(lengths))
        rows: list[list[int]] = []
        used = max_length + 1
        for index in order:
            if used + lengths[index] > max_length:
                rows.append([])
                used = 0
            rows[-1].append(int(index))
            used += int(lengths[index])
        packed = [np.asarray(row, dtype=np.int64) for row in rows]
        result[name] = {
            "records": split["conversations"],
            "tokens": split["token_count"],
            "rows": len(packed),
            "skipped": split["skipped"],
            "bytes": flat_tokens.nbytes + flat_trained.nbytes + offsets.nbytes,
        }
        held.append((flat_tokens, flat_trained, offsets, packed))
    return result, held


def memory_mb() -> dict[str, float]:
    """This process's resident set now and at its peak (VmRSS, VmHWM), in MB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024 / 1e6
    return fields


def child(spec: dict[str, Any]) -> None:
    """One setup measurement in this fresh process: everything imported and the tokenizer loaded first."""
    import moxin_lightning.data.chat_records  # noqa: F401
    import moxin_lightning.datamodules.chat  # noqa: F401  (import cost is not setup's)
    from moxin_lightning.datamodules.chat import ChatData
    from moxin_lightning.tokenizers.local import LocalTokenizer

    tokenizer = LocalTokenizer()
    gc.collect()
    before = memory_mb()
    start = time.perf_counter()
    if spec["path"] == "streamed":
        data = ChatData([spec["folder"]], tokenizer=tokenizer, max_length=MAX_LENGTH, batch_size=8)
        data.setup("fit")
        seconds = time.perf_counter() - start
        counts = {split: {"records": len(stream)} for split, stream in data.streams.items()}
    else:
        counts, held = old_setup(spec["inputs"], tokenizer, MAX_LENGTH, VAL_FRACTION)
        seconds = time.perf_counter() - start
    gc.collect()
    after = memory_mb()  # `data` / `held` are still referenced here: what setup keeps counts
    result = {
        "seconds": seconds,
        "rss_before_mb": before["VmRSS"],
        "rss_after_mb": after["VmRSS"],
        "rss_growth_mb": after["VmRSS"] - before["VmRSS"],
        "peak_growth_mb": max(0.0, after["VmHWM"] - before["VmRSS"]),
        "counts": counts,
    }
    if spec["path"] == "streamed":  # what setup leaves to the loader: opening the shards, the first batch
        start = time.perf_counter()
        next(iter(data.train_dataloader()))
        result["setup_to_first_batch_s"] = seconds + time.perf_counter() - start
        result["rss_growth_first_batch_mb"] = memory_mb()["VmRSS"] - before["VmRSS"]
    print("RESULT " + json.dumps(result), flush=True)


def measure_setup(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"setup measurement {spec} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


# ----------------------------------------------------------------------------------------- 3. loader vs a step


def loader_rate(folder: Path, tokenizer: Any, workers: int, args: argparse.Namespace, keep: int = 0) -> dict:
    """Tokens/s (rows x max_length) of `ChatData.train_dataloader()` over `args.batches` batches after the first
    (timed apart: it starts the readers); the first `keep` batches are returned for the step."""
    from moxin_lightning.datamodules.chat import ChatData

    data = ChatData(
        [str(folder)], tokenizer=tokenizer, max_length=MAX_LENGTH, pack=True, batch_size=args.batch_size,
        num_workers=workers, shuffle=True,
    )  # fmt: skip
    data.setup("fit")
    start = time.perf_counter()
    loader = data.train_dataloader()
    iterator = iter(loader)
    kept = [next(iterator)]
    first_s = time.perf_counter() - start
    batches = min(args.batches, len(loader) - 2 * workers - 2)  # full batches of one epoch
    positions = rows = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        positions += batch["input_ids"].numel()
        rows += batch["input_ids"].shape[0]
        if len(kept) < keep:
            kept.append(batch)
    seconds = time.perf_counter() - start
    del iterator
    return {
        "loader_workers": workers,
        "first_batch_s": first_s,
        "batches": batches,
        "seconds": seconds,
        "rows_per_batch": rows / batches,
        "tokens_per_s": positions / seconds,
        "conversations_per_s": batches * args.batch_size / seconds,
        "kept": kept,
    }


def step_rate(batches: list[dict], vocab_size: int, args: argparse.Namespace) -> dict:
    """Tokens/s of SFT optimizer steps of moxin-tiny-9m on `batches` (`Trainer.fit`, one batch per step)."""
    import lightning as L
    import torch
    import yaml
    from pretrain import StepClock

    from moxin_lightning.tasks import SFT

    model = yaml.safe_load(open(args.config))["model"]["init_args"]
    overrides = {**(model.get("model_overrides") or {}), "vocab_size": vocab_size, "max_seq_len": MAX_LENGTH}
    task = SFT(preset=model["preset"], model_overrides=overrides, seed=0, warmup_steps=0)
    clock = StepClock()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=len(batches), callbacks=[clock], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(task, torch.utils.data.DataLoader(batches, batch_size=None))
    step_s = [later - earlier for earlier, later in itertools.pairwise(clock.marks)]
    tokens_per_s = [batch["input_ids"].numel() / s for batch, s in zip(batches, step_s, strict=True)]
    return {
        "preset": model["preset"],
        "model_overrides": overrides,
        "params": task.model.num_params(),
        "step_s_all": step_s,
        "rows_all": [int(batch["input_ids"].shape[0]) for batch in batches],
        "tokens_per_s": statistics.median(tokens_per_s[args.warmup :]),
    }


# ------------------------------------------------------------------------------------------------------- main


def cpus() -> int:
    return len(os.sched_getaffinity(0))


def code_version() -> dict[str, Any]:
    """The commit measured, and whether tracked files differed from it (None outside a git checkout)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    import common

    from moxin_lightning.first_use import cache_root
    from moxin_lightning.tokenizers.local import LocalTokenizer

    began = time.perf_counter()
    work = Path(args.work) if args.work else cache_root() / "bench" / "instruct_data"
    workers = args.num_workers or cpus()
    tokenizer = LocalTokenizer()
    rows, table = [], []
    version = code_version()

    def record(measure: str, size: int, load_before: float, **fields: Any) -> dict:
        row = {
            "bench": "instruct_data",
            "measure": measure,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "conversations": size,
            "tokenizer": f"LocalTokenizer ({tokenizer.vocab_size} pieces)",
            "max_length": MAX_LENGTH,
            **version,
            **fields,
            **common.environment("cpu", load_before),
        }
        common.append_jsonl(args.out, [row])
        rows.append(row)
        return row

    for size in args.sizes:
        data, info = dataset(work, size, args.seed)
        files = sorted(data.glob("*.parquet"))
        print(
            f"== {size:,} conversations: {info['files']} parquet files, {info['bytes'] / 1e6:,.0f} MB "
            f"({data}; generated in {info['generate_s']:.0f} s)",
            flush=True,
        )
        prepared = work / f"prepared-{size}"

        # 1. prepare vs the tokenizer's batched encoder, peer first
        load = os.getloadavg()[0]
        peer_s, peer_tokens, texts = peer_encode(files, tokenizer)
        ours_s, manifest = run_prepare(data, prepared, tokenizer, workers)
        train = manifest["splits"]["train"]
        val = manifest["splits"].get("val", {"records": 0, "tokens": 0, "truncated": 0})
        conversations = train["records"] + val["records"]
        ours_tokens = manifest["tokens"]
        ratio = peer_s / ours_s * conversations / size
        row = record(
            "prepare", size, load,
            files=info["files"], parquet_bytes=info["bytes"], num_workers=workers, val_fraction=VAL_FRACTION,
            peer="tokenizer.encode_batch(message texts) (sentencepiece, all threads)", peer_texts=texts,
            peer_s=peer_s, peer_tokens=peer_tokens, peer_tokens_per_s=peer_tokens / peer_s,
            peer_conversations_per_s=size / peer_s, ours_s=ours_s, ours_conversations=conversations,
            ours_tokens=ours_tokens, ours_truncated=train["truncated"] + val["truncated"],
            ours_skipped=manifest["skipped"], ours_tokens_per_s=ours_tokens / ours_s,
            ours_conversations_per_s=conversations / ours_s, ratio_conversations_per_s=ratio,
        )  # fmt: skip
        print(
            f"prepare {ours_s:7.1f} s  {row['ours_conversations_per_s']:9,.0f} conv/s "
            f"{row['ours_tokens_per_s']:11,.0f} tok/s | encode_batch {peer_s:7.1f} s "
            f"{row['peer_conversations_per_s']:9,.0f} conv/s {row['peer_tokens_per_s']:11,.0f} tok/s | {ratio:.2f}x",
            flush=True,
        )
        table.append(
            ("prepare", size, f"{row['ours_conversations_per_s']:,.0f} conv/s", f"{ratio:.2f}x",
             ratio >= GOALS["prepare_ratio"])
        )  # fmt: skip

        # 2. setup, each path in a fresh process
        for path, spec in (
            ("streamed", {"path": "streamed", "folder": str(prepared)}),
            ("in-memory (old)", {"path": "old", "inputs": str(data / "*.parquet")}),
        ):
            load = os.getloadavg()[0]
            result = measure_setup(spec)
            if path != "streamed":  # the same conversations and tokens (the split hashes differ: no seed then)
                old = [sum(split[key] for split in result["counts"].values()) for key in ("records", "tokens")]
                if old != [conversations, ours_tokens]:
                    raise SystemExit(
                        f"the old path kept {old} conversations, tokens; prepare made {[conversations, ours_tokens]}"
                    )
            row = record("setup", size, load, path=path, **result)
            first = result.get("setup_to_first_batch_s")
            print(
                f"setup {path:<16} {result['seconds']:8.3f} s  RSS {result['rss_before_mb']:7,.0f} -> "
                f"{result['rss_after_mb']:7,.0f} MB (+{result['rss_growth_mb']:,.1f}, peak "
                f"+{result['peak_growth_mb']:,.1f})"
                + (
                    f"; to the first batch {first:.2f} s, +{result['rss_growth_first_batch_mb']:,.1f} MB"
                    if first is not None
                    else ""
                ),
                flush=True,
            )
            ok = result["seconds"] <= GOALS["setup_s"] and result["rss_growth_mb"] <= GOALS["setup_mb"]
            ok = ok if path == "streamed" else None  # the old path is the reference the goal is set against
            table.append(
                (f"setup {path}", size, f"{result['seconds']:.3f} s", f"+{result['rss_growth_mb']:,.1f} MB", ok)
            )

        # 3. loader vs SFT steps on its batches
        keep = args.warmup + args.steps
        loaders = []
        for index, loader_workers in enumerate(args.loader_workers):
            loaders.append(loader_rate(prepared, tokenizer, loader_workers, args, keep if index == 0 else 0))
        load = os.getloadavg()[0]
        step = step_rate(loaders[0]["kept"][:keep], tokenizer.vocab_size, args)
        for loader in loaders:
            loader.pop("kept")
            ratio = loader["tokens_per_s"] / step["tokens_per_s"]
            record(
                "loader", size, load, batch_size=args.batch_size, pack=True, **loader,
                step_tokens_per_s=step["tokens_per_s"], step=step, ratio_loader_over_step=ratio,
            )  # fmt: skip
            print(
                f"loader, {loader['loader_workers']} workers: {loader['tokens_per_s']:12,.0f} tok/s "
                f"({loader['rows_per_batch']:.1f} rows/batch, first batch {loader['first_batch_s']:.2f} s) | "
                f"SFT step {step['tokens_per_s']:8,.0f} tok/s | {ratio:,.0f}x",
                flush=True,
            )
            table.append(
                (f"loader {loader['loader_workers']} workers", size, f"{loader['tokens_per_s']:,.0f} tok/s",
                 f"{ratio:,.0f}x", ratio >= GOALS["loader_ratio"])
            )  # fmt: skip

    print(f"\n{'measure':<26} {'conversations':>13} {'figure':>22} {'vs goal':>14}  goal met")
    for name, size, figure, versus, ok in table:
        met = "(reference)" if ok is None else "yes" if ok else "NO"
        print(f"{name:<26} {size:>13,} {figure:>22} {versus:>14}  {met}")
    streamed = [row for row in rows if row["measure"] == "setup" and row["path"] == "streamed"]
    if len(streamed) > 1:
        first, last = streamed[0], streamed[-1]
        print(
            f"streamed setup from {first['conversations']:,} to {last['conversations']:,} conversations: "
            f"{first['seconds']:.3f} -> {last['seconds']:.3f} s, +{first['rss_growth_mb']:.1f} -> "
            f"+{last['rss_growth_mb']:.1f} MB; to the first batch {first['setup_to_first_batch_s']:.2f} -> "
            f"{last['setup_to_first_batch_s']:.2f} s, +{first['rss_growth_first_batch_mb']:.0f} -> "
            f"+{last['rss_growth_first_batch_mb']:.0f} MB"
        )
    print(f"\n{len(rows)} JSON lines appended to {args.out}; run took {(time.perf_counter() - began) / 60:.1f} min")


if __name__ == "__main__":
    main()
