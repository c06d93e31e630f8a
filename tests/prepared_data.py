"""Prepared-dataset folders for tests, written in-process.

The documents are synthetic (their ids say which dataset and document they come from), and the folder has
the layout `prepare` writes (train/, val/, manifest.json). litdata's `optimize` would start worker processes
and take seconds per split; its `BinaryWriter` writes the same chunks in milliseconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_document(index: int) -> np.ndarray:
    """Document `index` of a dataset: BOS, a body whose tokens encode the dataset, EOS."""
    rng = np.random.default_rng(index)
    base = 100 if index >= 10_000 else 3  # dataset A draws ids 3..99, dataset B 100..199
    return np.concatenate([[1], rng.integers(base, base + 97, rng.integers(5, 80)), [2]]).astype(np.int32)


def write_dataset(folder: Path, first_index: int, count: int, val_count: int = 20) -> Path:
    """A prepared-dataset folder of documents first_index.. (train) and the next `val_count` (val)."""
    from litdata.streaming.writer import BinaryWriter

    splits = {
        "train": range(first_index, first_index + count),
        "val": range(first_index + count, first_index + count + val_count),
    }
    summary = {}
    for split, indices in splits.items():
        writer = BinaryWriter(str(folder / split), chunk_bytes="8KB")
        for position, index in enumerate(indices):
            writer[position] = make_document(index)
        writer.done()
        writer.merge()
        summary[split] = {"documents": len(indices), "tokens": int(sum(len(make_document(i)) for i in indices))}
    manifest = {
        "fingerprint": f"fp-{first_index}-{count}",
        "tokenizer": {"fingerprint": "tok", "vocab_size": 200},
        "splits": summary,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def stream_of(folder: Path, split: str = "train") -> np.ndarray:
    """The split's documents back to back, in order: the token stream a non-shuffled reader sees."""
    from litdata import StreamingDataset

    return np.concatenate([np.asarray(doc) for doc in StreamingDataset(str(folder / split))])


def write_records(path: Path, records) -> str:
    """A jsonl file of `records` (dicts as JSON, strings as written: malformed lines for the skip tests)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def fresh_environment(tmp_path: Path) -> dict[str, str]:
    """Environment of a CLI run from nothing: its own home and first-use cache, W&B offline."""
    return {
        **os.environ,
        "HOME": str(tmp_path / "home"),
        "MOXIN_CACHE": str(tmp_path / "cache"),
        "WANDB_MODE": "offline",
    }


# The model part of the tiny `fit` configs that tests run through the CLI (a 2-layer Pretrain task).
TINY_PRETRAIN_MODEL = """\
seed_everything: 7
model:
  class_path: moxin_lightning.tasks.Pretrain
  init_args:
    preset: moxin-tiny-9m
    model_overrides: {vocab_size: 256, dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, head_dim: 16,
                      ffn_dim: 128, max_seq_len: 256, sliding_window: 64, attention: sdpa}
    lr: 3.0e-3
    warmup_steps: 2
"""


def train_tiny_bpe(folder: Path, words: list[str]) -> Path:
    """A 300-piece SentencePiece BPE with byte fallback, trained in milliseconds on rotations of `words`, that
    also covers the chat template's headers; returns its `tokenizer.model` in `folder`."""
    import io

    import sentencepiece as spm

    texts = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4
    texts += ["<|system|>\n<|user|>\n<|assistant|>\n"] * 10
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=300, model_type="bpe",
        byte_fallback=True, hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
    )  # fmt: skip
    path = folder / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def write_tiny_fit(tmp_path: Path, trainer: str) -> Path:
    """`tiny.yaml`: TINY_PRETRAIN_MODEL on a prepared folder of 200 documents (32-token rows, 2 per batch, one
    validation batch), the run in `tmp_path/run`, on a CPU without bar or summary; `trainer` adds trainer keys
    (YAML lines indented by two spaces)."""
    data = write_dataset(tmp_path / "data", 0, 200)
    config = tmp_path / "tiny.yaml"
    config.write_text(
        TINY_PRETRAIN_MODEL
        + f"""data:
  class_path: moxin_lightning.datamodules.PretrainData
  init_args: {{datasets: [{data}], seq_len: 32, batch_size: 2, val_batches: 1}}
trainer:
  default_root_dir: {tmp_path / "run"}
  accelerator: cpu
  enable_progress_bar: false
  enable_model_summary: false
"""
        + trainer
    )
    return config


class FitChain:
    """`python -m moxin_lightning fit` stages run one after another in one fresh working folder and cache (each
    from the release the stage before wrote), timed; the slow chain tests share it."""

    def __init__(self, tmp_path: Path) -> None:
        self.env = fresh_environment(tmp_path)
        self.work = tmp_path / "work"
        self.work.mkdir()
        self.logs = tmp_path / "logs"
        self.seconds: dict[str, float] = {}

    def run(self, stage: str, *arguments: str) -> None:
        """One `fit`, which must exit 0 (its stderr's end is the failure message)."""
        started = time.perf_counter()
        words = [sys.executable, "-m", "moxin_lightning", "fit", *arguments]
        result = subprocess.run(words, cwd=self.work, env=self.env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        self.seconds[stage] = time.perf_counter() - started

    def csv_logger(self, name: str) -> list[str]:
        """Flags logging every step of a stage to `logs/<name>/fit/metrics.csv`."""
        return [
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={self.logs}",
            f"--trainer.logger.init_args.name={name}",
            "--trainer.logger.init_args.version=fit",
            "--trainer.log_every_n_steps=1",  # the first step's row is what the chain tests read
        ]
