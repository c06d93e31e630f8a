"""A few records written exactly as Moxin's corpora are published on the Hugging Face Hub, for tests without a hub.

Each `write_*` lays files out under `folder` as `huggingface-cli download <repo> --repo-type dataset --local-dir
folder` leaves them: the publisher's file names and nesting, compression, field names, nested objects and parquet
column types (list<struct<content, role>> messages), JSON arrays. It returns a `Published`: the `--input` a user
passes (the glob over the published layout), the files, and the records in the order readers see them (files
sorted as a glob sorts them, records in file order; with the few files tests write, the order they were given in).

  * `write_slimpajama`: cerebras/SlimPajama-627B, `train/chunk*/example_train_*.jsonl.zst`, lines
    `{"text", "meta": {"redpajama_set_name"}}`;
  * `write_dclm`: mlfoundations/dclm-baseline-1.0, `global-shard_*/local-shard_*/shard_*_processed.jsonl.zst`,
    lines with `text`, `url`, the WARC `metadata`, `warcinfo` and the fastText quality score;
  * `write_dclm_parquet`: its parquet mirror (mlfoundations/dclm-baseline-1.0-parquet), the same fields as columns;
  * `write_the_stack`: bigcode/the-stack-dedup, `data/<lang>/data-*-of-*.parquet`, the file in column `content`
    beside `hexsha`, `size`, `ext`, `lang` and the repository columns;
  * `write_tulu_sft`: allenai/tulu-3-sft-mixture, `data/train-*-of-*.parquet`, columns `id`, `messages`
    (list<struct<content, role>>), `source`;
  * `write_tulu_preference`: allenai/llama-3.1-tulu-3-8b-preference-mixture, `data/train-*-of-*.parquet`, columns
    `id`, `prompt`, `chosen`, `rejected` (message lists, the user turn first), `source`;
  * `write_deepscaler`: agentica-org/DeepScaleR-Preview-Dataset, `deepscaler.json`, ONE JSON array of
    `{"problem", "answer", "solution"}` objects.

`docstrings`, `code_snippets`, `conversations`, `preference_pairs` and `math_problems` give real-looking content
(first paragraphs of standard-library docstrings, standard-library source) to fill them with.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SLIMPAJAMA_SETS = (
    "RedPajamaCommonCrawl",
    "RedPajamaC4",
    "RedPajamaGithub",
    "RedPajamaBook",
    "RedPajamaArXiv",
    "RedPajamaWikipedia",
    "RedPajamaStackExchange",
)
DCLM_SCORE = "fasttext_openhermes_reddit_eli5_vs_rw_v2_bigram_200k_train_prob"


@dataclass(frozen=True)
class Published:
    """What a writer laid out: the `--input` a user passes, the files (sorted, the order readers take them) and
    every record written, in reading order."""

    input: str
    files: list[Path]
    records: list[dict[str, Any]]


# ------------------------------------------------------------------------------------------------ pretraining


def write_slimpajama(folder: Path, texts: list[str], *, per_file: int = 2, files_per_chunk: int = 2) -> Published:
    """SlimPajama-627B's training split: `train/chunk<c>/example_train_<i>.jsonl.zst`, zstd JSON lines
    `{"text": ..., "meta": {"redpajama_set_name": ...}}`, `per_file` lines a file, chunks numbered from 1."""
    records = [
        {"text": text, "meta": {"redpajama_set_name": SLIMPAJAMA_SETS[n % len(SLIMPAJAMA_SETS)]}}
        for n, text in enumerate(texts)
    ]
    written = {}
    for number, part in enumerate(_parts(records, per_file)):
        chunk, index = divmod(number, files_per_chunk)
        path = folder / "train" / f"chunk{chunk + 1}" / f"example_train_{index}.jsonl.zst"
        written[_write_zstd_lines(path, part)] = part
    return _published(str(folder / "train" / "chunk*" / "example_train_*.jsonl.zst"), written)


def write_dclm(folder: Path, texts: list[str], *, per_file: int = 2, frames: int = 1) -> Published:
    """DCLM-baseline 1.0: `global-shard_01_of_10/local-shard_0_of_10/shard_<8 digits>_processed.jsonl.zst`, zstd
    JSON lines with the text, its URL, the WARC headers and the quality scores (`frames` > 1 writes each file as
    that many zstd frames, as parallel compressors do)."""
    records = [_dclm_record(n, text) for n, text in enumerate(texts)]
    shard = folder / "global-shard_01_of_10" / "local-shard_0_of_10"
    written = {
        _write_zstd_lines(shard / f"shard_{index:08d}_processed.jsonl.zst", part, frames): part
        for index, part in enumerate(_parts(records, per_file))
    }
    return _published(str(folder / "global-shard_*" / "local-shard_*" / "shard_*_processed.jsonl.zst"), written)


def write_dclm_parquet(folder: Path, texts: list[str], *, per_file: int = 2) -> Published:
    """DCLM-baseline's parquet mirror: the same shards and fields, as parquet files (nested objects as structs).
    The `--input` is a recursive glob, `**/*.parquet`, which does not depend on the folders above the shards."""
    records = [_dclm_record(n, text) for n, text in enumerate(texts)]
    shard = folder / "global-shard_01_of_10" / "local-shard_0_of_10"
    shard.mkdir(parents=True, exist_ok=True)
    written = {}
    for index, part in enumerate(_parts(records, per_file)):
        path = shard / f"shard_{index:08d}_processed.parquet"
        pq.write_table(pa.Table.from_pylist(part), path)
        written[path] = part
    return _published(str(folder / "**" / "*.parquet"), written)


def write_the_stack(folder: Path, files_by_language: dict[str, list[str]], *, per_file: int = 2) -> Published:
    """the-stack-dedup: `data/<language>/data-<5 digits>-of-<5 digits>.parquet`, one source file per row with
    its text in column `content` (hence `--text_key content`) and the Stack's metadata columns beside it."""
    written = {}
    for language, codes in files_by_language.items():
        parts = _parts([_stack_record(language, n, code) for n, code in enumerate(codes)], per_file)
        (folder / "data" / language).mkdir(parents=True, exist_ok=True)
        for index, part in enumerate(parts):
            path = folder / "data" / language / f"data-{index:05d}-of-{len(parts):05d}.parquet"
            pq.write_table(pa.Table.from_pylist(part, schema=_STACK_SCHEMA), path, row_group_size=1)
            written[path] = part
    return _published(str(folder / "data" / "*" / "data-*.parquet"), written)


# ------------------------------------------------------------------------------------------- instruction sets


def write_tulu_sft(folder: Path, conversations: list[list[dict[str, str]]], *, per_file: int = 2) -> Published:
    """The Tülu 3 SFT mixture: `data/train-<5 digits>-of-<5 digits>.parquet`, columns `id`, `messages`
    (list<struct<content, role>>: system / user / assistant turns) and `source`."""
    records = [
        {"id": f"oasst1_{1000 + n}", "messages": messages, "source": "ai2-adapt-dev/oasst1_converted"}
        for n, messages in enumerate(conversations)
    ]
    schema = pa.schema([("id", pa.string()), ("messages", _MESSAGES), ("source", pa.string())])
    return _write_hf_parquet(folder, records, schema, per_file)


def write_tulu_preference(folder: Path, pairs: list[tuple[str, str, str]], *, per_file: int = 2) -> Published:
    """The Tülu 3 8B preference mixture: `data/train-*.parquet`, columns `id`, `prompt` (the user's text),
    `chosen` and `rejected` (list<struct<content, role>>: the user turn, then the assistant's reply) and `source`.
    `pairs` are (prompt, chosen reply, rejected reply)."""
    records = [
        {
            "id": f"tulu-3-sft-reused-on-policy-8b_{n}",
            "prompt": prompt,
            "chosen": [{"content": prompt, "role": "user"}, {"content": chosen, "role": "assistant"}],
            "rejected": [{"content": prompt, "role": "user"}, {"content": rejected, "role": "assistant"}],
            "source": "allenai/tulu-3-sft-reused-on-policy-8b",
        }
        for n, (prompt, chosen, rejected) in enumerate(pairs)
    ]
    columns = [("id", pa.string()), ("prompt", pa.string()), ("chosen", _MESSAGES), ("rejected", _MESSAGES)]
    schema = pa.schema([*columns, ("source", pa.string())])
    return _write_hf_parquet(folder, records, schema, per_file)


def write_deepscaler(folder: Path, problems: list[dict[str, str]]) -> Published:
    """DeepScaleR-Preview-Dataset: `deepscaler.json`, ONE pretty-printed JSON array of `{"problem", "answer",
    "solution"}` objects (not JSON lines), LaTeX backslashes escaped as JSON writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    records = [{"problem": p["problem"], "answer": p["answer"], "solution": p["solution"]} for p in problems]
    path = folder / "deepscaler.json"
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return _published(str(path), {path: records})


# ------------------------------------------------------------------------------------------------- content


def docstrings(count: int) -> list[str]:
    """The opening paragraphs (at least 300 characters where there are) of the docstrings of `count` standard-library
    modules: English prose with line breaks and punctuation, the same for a given Python version."""
    import calendar
    import colorsys
    import csv
    import difflib
    import fnmatch
    import heapq
    import json
    import keyword
    import random
    import string

    modules = [heapq, json, csv, difflib, random, fnmatch, calendar, colorsys, string, keyword]
    assert count <= len(modules)
    return [_opening(inspect.getdoc(module), 300) for module in modules[:count]]


def _opening(text: str, length: int) -> str:
    paragraphs = text.split("\n\n")
    taken = 1
    while taken < len(paragraphs) and len("\n\n".join(paragraphs[:taken])) < length:
        taken += 1
    return "\n\n".join(paragraphs[:taken]).strip()


def code_snippets(count: int) -> list[str]:
    """The source of `count` small standard-library functions: Python code with its indentation and comments."""
    import colorsys
    import shlex
    import textwrap

    functions = [colorsys.rgb_to_hsv, shlex.quote, textwrap.indent, colorsys.hsv_to_rgb, textwrap.dedent]
    assert count <= len(functions)
    return [inspect.getsource(function) for function in functions[:count]]


def conversations(count: int) -> list[list[dict[str, str]]]:
    """`count` Tülu-style conversations about standard-library modules: a system turn on the first, a second
    user/assistant exchange on the last."""
    import bisect
    import heapq
    import shlex
    import textwrap

    modules = [heapq, bisect, textwrap, shlex]
    assert count <= len(modules)
    chats = []
    for n, module in enumerate(modules[:count]):
        answer = inspect.getdoc(module).split("\n\n")[0].strip()
        chat = [
            {"role": "user", "content": f"What is Python's {module.__name__} module for?"},
            {"role": "assistant", "content": answer},
        ]
        if n == 0:
            chat.insert(0, {"role": "system", "content": "You are a concise Python tutor."})
        chats.append(chat)
    if count > 1:
        chats[-1] += [
            {"role": "user", "content": "Is it part of the standard library?"},
            {"role": "assistant", "content": "Yes: it ships with every CPython installation."},
        ]
    return chats


def preference_pairs(count: int) -> list[tuple[str, str, str]]:
    """`count` (prompt, chosen, rejected): a correct explanation of a module against a wrong one."""
    import bisect
    import colorsys
    import heapq

    cases = [(heapq, "sorts a list in place"), (bisect, "hashes keys"), (colorsys, "draws images")]
    assert count <= len(cases)
    return [
        (
            f"Explain the {module.__name__} module in one sentence.",
            inspect.getdoc(module).split("\n\n")[0].strip(),
            f"The {module.__name__} module {wrong}.",
        )
        for module, wrong in cases[:count]
    ]


def math_problems(count: int) -> list[dict[str, str]]:
    """`count` competition-style problems as DeepScaleR holds them: LaTeX problem, short answer, boxed solution."""
    problems = [
        {
            "problem": "Let $f(x) = 2x^2 - 3x + 1$. Find the sum of the roots of $f(x) = 0$.",
            "answer": "\\frac{3}{2}",
            "solution": "By Vieta's formulas the roots sum to $-\\frac{-3}{2} = \\frac{3}{2}$, so the answer is "
            "$\\boxed{\\frac{3}{2}}$.",
        },
        {
            "problem": "How many positive divisors does $360$ have?",
            "answer": "24",
            "solution": "$360 = 2^3 \\cdot 3^2 \\cdot 5$, so it has $(3+1)(2+1)(1+1) = \\boxed{24}$ divisors.",
        },
        {
            "problem": "A circle has area $49\\pi$. What is its circumference?",
            "answer": "14\\pi",
            "solution": "$\\pi r^2 = 49\\pi$ gives $r = 7$, so the circumference is $2\\pi r = \\boxed{14\\pi}$.",
        },
    ]
    assert count <= len(problems)
    return problems[:count]


# ------------------------------------------------------------------------------------------------- helpers


def _published(pattern: str, written: dict[Path, list[dict[str, Any]]]) -> Published:
    """The files in the order a glob over them is read (sorted), and their records in that order."""
    files = sorted(written, key=str)
    return Published(pattern, files, [record for path in files for record in written[path]])


def _parts(records: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [records[start : start + size] for start in range(0, len(records), size)]


def _write_zstd_lines(path: Path, records: list[dict[str, Any]], frames: int = 1) -> Path:
    import zstandard

    lines = [json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n" for record in records]
    step = -(-len(lines) // frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        for start in range(0, len(lines), step):
            file.write(zstandard.ZstdCompressor(level=3).compress(b"".join(lines[start : start + step])))
    return path


def _dclm_record(n: int, text: str) -> dict[str, Any]:
    url = f"https://docs.example.org/library/page-{n}.html"
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()
    return {
        "bff_contained_ngram_count_before_dedupe": n % 3,
        "language_id_whole_page_fasttext": {"en": 0.95 - n / 100},
        "metadata": {
            "Content-Length": str(len(text.encode("utf-8")) + 512),
            "Content-Type": "application/http; msgtype=response",
            "WARC-Date": f"2019-03-{10 + n % 18:02d}T08:{n % 60:02d}:00Z",
            "WARC-Identified-Payload-Type": "text/html",
            "WARC-Payload-Digest": f"sha1:{digest.upper()[:32]}",
            "WARC-Record-ID": f"<urn:uuid:{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}>",
            "WARC-Target-URI": url,
            "WARC-Type": "response",
        },
        "previous_word_count": len(text.split()) + 40,
        "text": text,
        "url": url,
        "warcinfo": "isPartOf: CC-MAIN-2019-13\r\npublisher: Common Crawl\r\nformat: WARC File Format 1.0",
        DCLM_SCORE: 0.02 + n / 50,
    }


def _stack_record(language: str, n: int, code: str) -> dict[str, Any]:
    lines = code.splitlines() or [""]
    extension, name = _STACK_LANGUAGES.get(language, (language, language.capitalize()))
    return {
        "hexsha": hashlib.sha1(code.encode("utf-8")).hexdigest(),
        "size": len(code.encode("utf-8")),
        "ext": extension,
        "lang": name,
        "max_stars_repo_path": f"src/module_{n}.{extension}",
        "max_stars_repo_name": f"example/{language}-utilities",
        "max_stars_repo_head_hexsha": hashlib.sha1(f"{language}{n}".encode()).hexdigest(),
        "max_stars_repo_licenses": ["MIT"],
        "max_stars_count": None if n % 2 else 12 + n,
        "content": code,
        "avg_line_length": sum(len(line) for line in lines) / len(lines),
        "max_line_length": max(len(line) for line in lines),
        "alphanum_fraction": sum(c.isalnum() for c in code) / max(1, len(code)),
    }


def _write_hf_parquet(folder: Path, records: list[dict[str, Any]], schema: Any, per_file: int) -> Published:
    """`data/train-<i>-of-<n>.parquet`, the shard names `datasets` gives a Hub upload."""
    parts = _parts(records, per_file)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    written = {}
    for index, part in enumerate(parts):
        path = folder / "data" / f"train-{index:05d}-of-{len(parts):05d}.parquet"
        pq.write_table(pa.Table.from_pylist(part, schema=schema), path)
        written[path] = part
    return _published(str(folder / "data" / "train-*.parquet"), written)


_MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
_STACK_LANGUAGES = {"python": ("py", "Python"), "javascript": ("js", "JavaScript"), "c": ("c", "C"), "go": ("go", "Go")}
_STACK_SCHEMA = pa.schema(
    [
        ("hexsha", pa.string()),
        ("size", pa.int64()),
        ("ext", pa.string()),
        ("lang", pa.string()),
        ("max_stars_repo_path", pa.string()),
        ("max_stars_repo_name", pa.string()),
        ("max_stars_repo_head_hexsha", pa.string()),
        ("max_stars_repo_licenses", pa.list_(pa.string())),
        ("max_stars_count", pa.int64()),
        ("content", pa.string()),
        ("avg_line_length", pa.float64()),
        ("max_line_length", pa.int64()),
        ("alphanum_fraction", pa.float64()),
    ]
)
