"""Tokenizers: the `Tokenizer` protocol and its implementations."""

from moxin_lightning.tokenizers.base import Tokenizer, file_fingerprint
from moxin_lightning.tokenizers.sentencepiece import SentencePieceTokenizer

__all__ = ["SentencePieceTokenizer", "Tokenizer", "file_fingerprint"]
