"""Records with nothing to learn are skipped and counted, never trained on: a conversation that opens with the
assistant (a reply to nothing) or ends on a user turn (a question with no answer), a preference pair whose
chosen and rejected responses are the same. Through `prepare --format` on the command line: the manifest counts
them by reason, the console says so, and the datamodule serves only the usable records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from moxin_lightning.data import read_manifest
from moxin_lightning.data.chat_records import ENDS_WITH_USER, OPENS_WITH_ASSISTANT
from moxin_lightning.data.preference_records import SAME_RESPONSES
from moxin_lightning.datamodules import ChatData, PreferenceData
from tests.prepared_data import fresh_environment
from tests.test_instruction_shapes import tokenizer  # noqa: F401  (a fixture)


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def prepare(tmp_path: Path, records: list[dict], tokenizer, fmt: str) -> tuple[subprocess.CompletedProcess, Path]:  # noqa: F811
    source = tmp_path / f"{fmt}.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in records))
    output = tmp_path / f"prepared-{fmt}"
    words = [sys.executable, "-m", "moxin_lightning", "prepare", "--format", fmt, "--input", str(source)]
    words += ["--tokenizer", str(tokenizer.path), "--output", str(output), "--num_workers", "1", "--val_fraction", "0"]
    result = subprocess.run(words, env=fresh_environment(tmp_path), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return result, output


def test_conversations_without_a_prompt_or_without_a_reply_are_skipped(tmp_path, tokenizer):  # noqa: F811
    good = {"messages": [turn("system", "Be brief."), turn("user", "Name a prime."), turn("assistant", "Seven.")]}
    records = [
        good,
        {"messages": [turn("assistant", "Hello, how can I help?"), turn("user", "Thanks.")]},
        {"messages": [turn("system", "Be brief."), turn("assistant", "Hi."), turn("user", "Hi.")]},
        {"messages": [turn("user", "What is 2 + 2?"), turn("assistant", "4."), turn("user", "And 3 + 3?")]},
    ]
    result, output = prepare(tmp_path, records, tokenizer, "chat")
    manifest = read_manifest(output)
    assert manifest["splits"]["train"]["records"] == 1
    assert manifest["splits"]["train"]["skipped"] == {ENDS_WITH_USER: 1, OPENS_WITH_ASSISTANT: 2}
    assert manifest["splits"]["train"]["skipped_examples"] == [
        f"{tmp_path / 'chat.jsonl'}:2: {OPENS_WITH_ASSISTANT}",
        f"{tmp_path / 'chat.jsonl'}:3: {OPENS_WITH_ASSISTANT}",
        f"{tmp_path / 'chat.jsonl'}:4: {ENDS_WITH_USER}",
    ]
    assert result.stdout.splitlines()[-1] == (f"skipped 3 records: {ENDS_WITH_USER}: 1, {OPENS_WITH_ASSISTANT}: 2")
    data = ChatData([str(output)], batch_size=4, shuffle=False)
    (batch,) = list(data.train_dataloader())
    assert batch["input_ids"].shape[0] == 1  # the one usable conversation, alone


def test_a_pair_whose_chosen_equals_its_rejected_is_skipped(tmp_path, tokenizer):  # noqa: F811
    records = [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
        {"prompt": "Capital of Spain?", "chosen": "Madrid.", "rejected": "Madrid."},
        {
            "prompt": "Capital of Italy?",
            "chosen": [turn("user", "Capital of Italy?"), turn("assistant", "Rome.")],
            "rejected": [turn("user", "Capital of Italy?"), turn("assistant", "Rome.")],
        },
    ]
    result, output = prepare(tmp_path, records, tokenizer, "preference")
    manifest = read_manifest(output)
    assert manifest["splits"]["train"]["records"] == 1
    assert manifest["splits"]["train"]["skipped"] == {SAME_RESPONSES: 2}
    assert result.stdout.splitlines()[-1] == f"skipped 2 records: {SAME_RESPONSES}: 2"
    assert PreferenceData([str(output)], batch_size=4).pair_count() == 1
