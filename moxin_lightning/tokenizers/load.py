"""Open a tokenizer saved on disk, whatever its kind."""

from __future__ import annotations

from pathlib import Path

from moxin_lightning.tokenizers.base import Tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A MoE tokenizer folder (it holds the MoE layout file), or a SentencePiece model file or its folder."""
    from moxin_lightning.tokenizers.moe import LAYOUT_FILE, MoETokenizer
    from moxin_lightning.tokenizers.sentencepiece import SentencePieceTokenizer

    path = Path(path).expanduser()
    return MoETokenizer.load(path) if (path / LAYOUT_FILE).is_file() else SentencePieceTokenizer(path)
