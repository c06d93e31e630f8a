"""`prepare` throughput against plain sentencepiece on the same texts, same cores, same run.

What is measured, with the Mistral 32K tokenizer (`mistral_common/data/tokenizer.model.v1`, installed with
`pip install --no-deps mistral_common`):

  * peer: `SentencePieceProcessor.encode(texts)`, one batch call (sentencepiece's own threads, all cores),
    tokens only, in memory;
  * ours: `prepare` of the same texts written to `--files` .jsonl shards of about equal size, with
    `num_workers` = the cores: reading and hashing the files, the hash split, `encode_batch` in litdata
    workers, the int32 train and val shards, the token-stream sha256 and the manifest, all in the wall time;
  * ours end to end from the `builtin:` inputs themselves, which adds extracting the corpus (for prose,
    parsing the standard library for docstrings) in the main process.

Tokens/s counts BOS + ids + EOS for both (the peer's count gets the same 2 per document), and the run checks
that ours wrote exactly that many tokens. The ratio is ours / peer (median of `--repeats` interleaved runs);
the goal is >= 0.8. One JSON line is appended to `--out`.

Run (under a minute on 2 CPU cores):

    python bench/prepare.py --repeats 5
    python bench/prepare.py --repeats 5 --input builtin:prose --input 'builtin:code?max_mb=16'

(the second is the steady state: the fixed cost of starting litdata workers twice, ~0.1 s, weighs on 4 MB)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.resources
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import sentencepiece as spm

from moxin_lightning.data import read_manifest
from moxin_lightning.data.builtin import iter_documents
from moxin_lightning.data.prepare import prepare
from moxin_lightning.tokenizers import SentencePieceTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input", action="append", help="builtin corpus (repeatable); default builtin:prose (all of it, ~4 MB)"
    )
    parser.add_argument("--files", type=int, default=8, help="jsonl files the texts are spread over")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "prepare.jsonl"))
    args = parser.parse_args()

    model = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    tokenizer = SentencePieceTokenizer(str(model))
    processor = spm.SentencePieceProcessor(model_file=str(model))
    specs = args.input or ["builtin:prose"]
    start = time.perf_counter()
    texts = [record.text for spec in specs for record in iter_documents(spec) if record.text is not None]
    extract_s = time.perf_counter() - start
    text_bytes = sum(len(text.encode()) for text in texts)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for index, shard in enumerate(_shards(texts, args.files)):
            with open(tmp / f"part-{index:03d}.jsonl", "w", encoding="utf-8") as file:
                file.writelines(json.dumps({"text": text}) + "\n" for text in shard)

        peer_s, ours_s, builtin_s = [], [], []
        peer_tokens = ours_tokens = 0
        for repeat in range(args.repeats):
            start = time.perf_counter()
            peer_tokens = sum(len(ids) + 2 for ids in processor.encode(texts))
            peer_s.append(time.perf_counter() - start)

            start = time.perf_counter()
            out = prepare([str(tmp / "*.jsonl")], tokenizer, tmp / f"ours{repeat}", num_workers=args.num_workers)
            ours_s.append(time.perf_counter() - start)
            ours_tokens = read_manifest(out)["tokens"]

            start = time.perf_counter()
            prepare(specs, tokenizer, tmp / f"builtin{repeat}", num_workers=args.num_workers)
            builtin_s.append(time.perf_counter() - start)
        manifest = read_manifest(out)

    if ours_tokens != peer_tokens:
        raise SystemExit(f"token counts differ: prepare wrote {ours_tokens}, sentencepiece made {peer_tokens}")
    peer_tps = peer_tokens / statistics.median(peer_s)
    ours_tps = ours_tokens / statistics.median(ours_s)
    builtin_tps = ours_tokens / statistics.median(builtin_s)
    record = {
        "bench": "prepare",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "tokenizer": "mistral_common tokenizer.model.v1 (32000)",
        "input": specs,
        "documents": len(texts),
        "text_bytes": text_bytes,
        "tokens": ours_tokens,
        "files": args.files,
        "num_workers": args.num_workers,
        "repeats": args.repeats,
        "peer": "sentencepiece.SentencePieceProcessor.encode(list) (all threads)",
        "peer_s_all": peer_s,
        "ours_s_all": ours_s,
        "ours_builtin_s_all": builtin_s,
        "corpus_extract_s": extract_s,
        "peer_tokens_per_s": peer_tps,
        "ours_tokens_per_s": ours_tps,
        "ours_builtin_tokens_per_s": builtin_tps,
        "ratio_ours_over_peer": ours_tps / peer_tps,
        "ratio_builtin_over_peer": builtin_tps / peer_tps,
        "val_documents": manifest["splits"]["val"]["documents"],
        "sentencepiece": spm.__version__,
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "cpu": platform.machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as file:
        file.write(json.dumps(record) + "\n")
    print(f"{len(texts):,} documents, {text_bytes / 1e6:.1f} MB, {ours_tokens:,} tokens, {args.num_workers} workers")
    print(f"sentencepiece encode         {peer_tps:12,.0f} tokens/s")
    print(f"prepare, jsonl shards        {ours_tps:12,.0f} tokens/s   ratio {ours_tps / peer_tps:.2f}x")
    print(f"prepare, builtin inputs      {builtin_tps:12,.0f} tokens/s   ratio {builtin_tps / peer_tps:.2f}x")
    print(f"  (builtin: {' '.join(specs)}, including {extract_s:.1f} s to extract the corpus)")


def _shards(texts: list[str], count: int) -> list[list[str]]:
    """`count` consecutive shards of about equal text size, like the files of a sharded corpus."""
    total, done = sum(len(text) for text in texts), 0
    shards: list[list[str]] = [[] for _ in range(count)]
    for text in texts:
        shards[min(count - 1, done * count // total)].append(text)
        done += len(text)
    return shards


if __name__ == "__main__":
    main()
