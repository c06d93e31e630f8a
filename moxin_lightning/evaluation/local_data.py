"""The data of the local task set (`tasks/local`): made here, deterministically, and shipped in the package.

lm-eval resolves a task's `dataset_kwargs.data_files` against the current directory, so the YAMLs name
`local_dataset` below as their `custom_dataset` instead: it reads the file from this package wherever the
command runs, in memory (nothing is written to the Hugging Face datasets cache, nothing is downloaded).

* `arithmetic.jsonl`: GSM8K-style word problems from `builtin_chat.arithmetic_problem` (the same
  generator the local SFT data uses, different seeds). Each record holds the question, the answer, and
  four answer choices: the right one, the answer of a worked solution with one slip
  (`builtin_chat.wrong_solution`) and near misses, in a seeded order. Split `train` feeds few-shot
  examples, `test` is scored.
* `text.txt`: a dozen paragraphs written for this task set (not taken from the training corpus),
  separated by blank lines, for perplexity.

`python -m moxin_lightning.evaluation.local_data` rewrites `arithmetic.jsonl`; a test checks that the shipped
file equals what it writes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "tasks" / "local" / "data"
SPLIT_SEEDS = {"train": (10_000, 8), "test": (20_000, 40)}  # split -> (first problem seed, number of problems)


def local_dataset(data_file: str, **_: Any):
    """`custom_dataset` of the local tasks: a DatasetDict of `DATA_DIR/data_file` (lm-eval passes the task's
    metadata as further keyword arguments, which are not needed here)."""
    import datasets

    path = DATA_DIR / data_file
    if not path.is_file():
        raise FileNotFoundError(f"local task data {path} is missing; reinstall moxin_lightning")
    if path.suffix == ".txt":
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": p} for p in paragraphs])})
    splits: dict[str, list[dict[str, Any]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        splits.setdefault(record.pop("split"), []).append(record)
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


def arithmetic_records() -> list[dict[str, Any]]:
    """The records of `arithmetic.jsonl`, in file order."""
    from moxin_lightning.data.builtin_chat import arithmetic_problem, wrong_solution

    records = []
    for split, (first, count) in SPLIT_SEEDS.items():
        for seed in range(first, first + count):
            question, _, answer = arithmetic_problem(seed)
            _, slip = wrong_solution(seed)
            choices = _answer_choices(answer, slip, random.Random(seed))
            records.append(
                {
                    "split": split,
                    "id": seed,
                    "question": question,
                    "answer": str(answer),
                    "choices": [str(c) for c in choices],
                    "label": choices.index(answer),
                }
            )
    return records


def _answer_choices(answer: int, slip: int, rng: random.Random) -> list[int]:
    """The answer, the slipped answer and two more distinct non-negative near misses, shuffled."""
    choices = [answer, slip]
    while len(choices) < 4:
        candidate = answer + rng.choice([-10, -5, -3, -2, -1, 1, 2, 3, 5, 10])
        if candidate >= 0 and candidate not in choices:
            choices.append(candidate)
    rng.shuffle(choices)
    return choices


def write_arithmetic(path: Path = DATA_DIR / "arithmetic.jsonl") -> Path:
    """(Re)write the arithmetic data file atomically."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in arithmetic_records())
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)
    return path


if __name__ == "__main__":
    print(f"wrote {write_arithmetic()}")
