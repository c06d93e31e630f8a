"""What the rest of the platform needs from a tokenizer, whatever its kind."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids. Data preparation, training, generation and export use only this.

    `fingerprint` identifies the exact vocabulary (a hash of the model file or files): prepared data
    records it, and training refuses data made with another tokenizer.
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, directory: str | Path) -> None:
        """Write the files that reload this tokenizer (a Hugging Face model folder's tokenizer files)."""
        ...


def file_fingerprint(*paths: str | Path) -> str:
    """sha256 over the bytes of the given files, in order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()
