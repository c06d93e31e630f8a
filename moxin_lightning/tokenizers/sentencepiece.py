"""A SentencePiece model file (Moxin / Mistral / Llama `tokenizer.model`) as a `Tokenizer`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import sentencepiece as spm

from moxin_lightning.tokenizers.base import file_fingerprint


class SentencePieceTokenizer:
    """Loads `tokenizer.model` as is; `path` may also be a folder holding one (e.g. a HF model folder)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path} not found; pass a SentencePiece tokenizer.model or its folder")
        self.path = path
        try:
            self.processor = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{path} is not a SentencePiece model: {str(error).splitlines()[0]}") from None
        self._fingerprint = file_fingerprint(path)

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def pad_id(self) -> int:
        """The model's pad piece, or <unk> when it has none (Moxin's pretraining script pads with unk)."""
        pad = self.processor.pad_id()
        return pad if pad >= 0 else self.processor.unk_id()

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.processor.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (sentencepiece's C++ loop, no per-text Python overhead)."""
        return self.processor.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        shutil.copyfile(self.path, directory / "tokenizer.model")
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": self.processor.id_to_piece(self.bos_id),
            "eos_token": self.processor.id_to_piece(self.eos_id),
            "unk_token": self.processor.id_to_piece(self.processor.unk_id()),
            "add_bos_token": True,
            "add_eos_token": False,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
