"""Moxin's instruction sets as their publishers ship them, through `python -m moxin_lightning prepare --format ...`.

The records are written in the publishers' shapes (`tests/publisher_records.py`): the Tülu 3 SFT mixture's parquet
(`messages` as list<struct<content, role>>) for `--format chat`, the Tülu 3 preference mixture's parquet (a `prompt`
string and `chosen` / `rejected` message lists that repeat the user turn) for `--format preference`, and
DeepScaleR's single JSON array of {problem, answer, solution} for `--format prompts` with DeepScaleR's instruction.
Each is prepared by the real command line in a subprocess; the manifest's counts and every item's ids must be what
the Tülu template and the tokenizer give for exactly the published records, and the datamodules must read the
folder back (the tokenizer it carries included).
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from moxin_lightning.data import read_manifest
from moxin_lightning.datamodules.chat import ChatData
from moxin_lightning.datamodules.preference import PreferenceData
from moxin_lightning.datamodules.prompts import PromptData
from moxin_lightning.tokenizers import SentencePieceTokenizer
from moxin_lightning.tokenizers.chat import TULU
from tests.prepared_data import fresh_environment
from tests.publisher_records import (
    code_snippets,
    conversations,
    docstrings,
    math_problems,
    preference_pairs,
    write_deepscaler,
    write_tulu_preference,
    write_tulu_sft,
)

# DeepScaleR's (and Moxin-Reasoning's) instruction, appended to every problem after a space.
INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docstrings(10) + code_snippets(5)), model_writer=model, vocab_size=400,
        model_type="bpe", byte_fallback=True, hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return SentencePieceTokenizer(path)


def prepare_command(tmp_path: Path, pattern: str, tokenizer, *options: str) -> tuple[dict, Path]:
    """`python -m moxin_lightning prepare` as a user types it; the manifest and the output folder."""
    output = tmp_path / "prepared"
    words = [sys.executable, "-m", "moxin_lightning", "prepare", "--input", pattern, "--tokenizer", str(tokenizer.path)]
    words += ["--output", str(output), "--num_workers", "2", "--val_fraction", "0", *options]
    result = subprocess.run(words, env=fresh_environment(tmp_path), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(output)
    assert f"fingerprint {manifest['fingerprint']}" in result.stdout
    return manifest, output


def stored_items(folder: Path) -> list[dict]:
    """Every item of the train split, in order, through litdata's reader."""
    from litdata import StreamingDataset

    dataset = StreamingDataset(str(folder / "train"))
    return [dataset[i] for i in range(len(dataset))]


def counts(manifest: dict) -> dict:
    entry = manifest["splits"]["train"]
    return {key: entry[key] for key in ("records", "tokens", "trained_tokens", "truncated", "skipped")}


def test_tulu_sft_parquet_prepares_as_chat_and_trains_on_assistant_tokens_only(tmp_path, tokenizer):
    published = write_tulu_sft(tmp_path / "tulu-3-sft-mixture", conversations(4))  # two parquet files
    manifest, output = prepare_command(tmp_path, published.input, tokenizer, "--format", "chat")
    chats = [record["messages"] for record in published.records]
    encoded = [TULU.encode(tokenizer, messages) for messages in chats]
    assert manifest["records"]["format"] == "chat" and manifest["records"]["template"]["name"] == "tulu"
    assert manifest["records"]["max_length"] == 4096  # Moxin-Instruct's SFT length, the default
    assert counts(manifest) == {
        "records": 4,
        "tokens": sum(len(ids) for ids, _ in encoded),
        "trained_tokens": sum(sum(trained[1:]) for _, trained in encoded),  # a label needs a token before it
        "truncated": 0,
        "skipped": {},
    }
    assert [source["path"] for source in manifest["sources"]] == [str(path) for path in published.files]
    assert [source["records"] for source in manifest["sources"]] == [2, 2]
    items = stored_items(output)
    assert [item["ids"].tolist() for item in items] == [ids for ids, _ in encoded]
    assert [item["trained"].astype(bool).tolist() for item in items] == [trained for _, trained in encoded]

    data = ChatData([str(output)], pack=False, shuffle=False, batch_size=4)  # the folder's own tokenizer
    batch = next(iter(data.ordered_dataloader()))
    assert data.tokenizer.fingerprint == tokenizer.fingerprint and data.max_length == 4096
    eos = tokenizer.eos_id
    for row, messages in enumerate(chats):
        ids = encoded[row][0]
        assert batch["input_ids"][row, : len(ids)].tolist() == ids
        labels = batch["labels"][row].tolist()
        replies = [t for m in messages if m["role"] == "assistant" for t in tokenizer.encode(m["content"]) + [eos]]
        assert [label for label in labels if label != -100] == replies  # every assistant token, nothing else
        for t, label in enumerate(labels[: len(ids) - 1]):
            assert label == (ids[t + 1] if encoded[row][1][t + 1] else -100)


def test_tulu_preference_parquet_extracts_the_repeated_user_turn_as_the_shared_prompt(tmp_path, tokenizer):
    published = write_tulu_preference(tmp_path / "tulu-3-preference-mixture", preference_pairs(3))
    manifest, output = prepare_command(tmp_path, published.input, tokenizer, "--format", "preference")
    eos = tokenizer.eos_id
    expected = []
    for record in published.records:
        user = record["chosen"][0]
        assert user == {"role": "user", "content": record["prompt"]}  # the shape: the user turn comes first
        prompt, _ = TULU.encode(tokenizer, [user], add_generation_prompt=True)  # one user turn, not two
        replies = [tokenizer.encode(record[side][1]["content"]) + [eos] for side in ("chosen", "rejected")]
        for reply, side in zip(replies, ("chosen", "rejected"), strict=True):
            full, _ = TULU.encode(tokenizer, [user, record[side][1]])
            assert full == prompt + reply  # the template's sequence is the prompt, then only the reply
        expected.append((prompt, *replies))
    assert manifest["records"]["format"] == "preference" and manifest["records"]["max_length"] == 2048
    assert counts(manifest) == {
        "records": 3,
        "tokens": sum(2 * len(prompt) + len(chosen) + len(rejected) for prompt, chosen, rejected in expected),
        "trained_tokens": sum(len(chosen) + len(rejected) for _, chosen, rejected in expected),
        "truncated": 0,
        "skipped": {},
    }
    items = stored_items(output)
    for item, (prompt, chosen, rejected) in zip(items, expected, strict=True):
        assert item["prompt"].tolist() == prompt
        assert item["chosen"].tolist() == chosen and item["rejected"].tolist() == rejected
        assert item["chosen_trained"].tolist() == [1] * len(chosen)
        assert item["rejected_trained"].tolist() == [1] * len(rejected)

    data = PreferenceData([str(output)], shuffle=False, batch_size=3)
    batch = next(iter(data.ordered_dataloader()))
    assert batch["pair_index"].tolist() == [0, 1, 2]
    for row, (prompt, chosen, rejected) in enumerate(expected):
        for side, reply in (("chosen", chosen), ("rejected", rejected)):
            ids = prompt + reply
            assert batch[f"{side}_input_ids"][row, : len(ids)].tolist() == ids
            labels = batch[f"{side}_labels"][row].tolist()
            assert labels[: len(ids)] == [-100] * (len(prompt) - 1) + reply + [-100]


def test_deepscaler_json_array_prepares_as_prompts_with_its_instruction_and_answers(tmp_path, tokenizer):
    problems = math_problems(3) + [
        {  # as in DeepScaleR, the `answer` field and the solution's \boxed{} may be written differently
            "problem": "What is $\\frac{1}{2} + 1$?",
            "answer": "\\frac{3}{2}",
            "solution": "$\\frac{1}{2} + 1 = \\boxed{\\dfrac{3}{2}}$.",
        }
    ]
    published = write_deepscaler(tmp_path / "DeepScaleR-Preview-Dataset", problems)
    options = ("--format", "prompts", "--instruction", INSTRUCTION)
    manifest, output = prepare_command(tmp_path, published.input, tokenizer, *options)
    prompts = [[{"role": "user", "content": f"{record['problem']} {INSTRUCTION}"}] for record in published.records]
    encoded = [TULU.encode(tokenizer, prompt, add_generation_prompt=True)[0] for prompt in prompts]
    assert manifest["records"]["format"] == "prompts"
    assert manifest["records"]["instruction"] == INSTRUCTION and manifest["records"]["max_prompt_length"] == 1024
    assert counts(manifest) == {
        "records": 4,
        "tokens": sum(len(ids) for ids in encoded),
        "trained_tokens": 0,
        "truncated": 0,
        "skipped": {},
    }
    items = stored_items(output)
    assert [item["ids"].tolist() for item in items] == encoded
    assert [item["text"] for item in items] == [prompt[0]["content"] for prompt in prompts]
    assert [item["answer"] for item in items] == ["\\frac{3}{2}", "24", "14\\pi", "\\frac{3}{2}"]  # not \dfrac
    assert all(np.asarray(item["ids"]).dtype == np.int32 for item in items)

    data = PromptData([str(output)], shuffle=False, batch_size=4)  # instruction and length from the folder
    batch = next(iter(data.ordered_dataloader()))
    assert data.instruction == INSTRUCTION
    assert batch["prompt_ids"] == encoded and batch["answer"] == [item["answer"] for item in items]
    assert batch["prompt_index"].tolist() == [0, 1, 2, 3]
