"""The README's Python snippets run as written when pasted in order into one session, in an empty folder."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)


def test_the_readme_python_snippets_run_in_order(tmp_path, monkeypatch):
    blocks = readme_python_blocks()
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    session: dict = {}
    for number, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), session)  # noqa: S102 (our README)
        except Exception as error:  # pragma: no cover - the message names the block
            raise AssertionError(f"README python block {number} fails: {error!r}\n{block}") from error
    assert session["logits"].shape == (2, 12, 32000)
    assert len(session["new_tokens"]) == 2 and all(0 < len(tokens) <= 64 for tokens in session["new_tokens"])
    # the last block exported the model and read it back: the same logits as the first block computed
    reloaded = session["model"](session["input_ids"], doc_ids=session["doc_ids"])
    torch.testing.assert_close(reloaded, session["logits"], rtol=0, atol=0)
