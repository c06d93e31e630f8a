"""Tokenizers: the `Tokenizer` protocol and its implementations, tokenizer training, vocabulary extension."""

from moxin_lightning.tokenizers.base import Tokenizer, file_fingerprint
from moxin_lightning.tokenizers.chat import ChatTemplate, TuluTemplate
from moxin_lightning.tokenizers.extend import extend_vocabulary
from moxin_lightning.tokenizers.load import load_tokenizer
from moxin_lightning.tokenizers.local import LocalTokenizer
from moxin_lightning.tokenizers.moe import MoETokenizer
from moxin_lightning.tokenizers.sentencepiece import SentencePieceTokenizer
from moxin_lightning.tokenizers.train import train_tokenizer

__all__ = [
    "ChatTemplate",
    "LocalTokenizer",
    "MoETokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TuluTemplate",
    "extend_vocabulary",
    "file_fingerprint",
    "load_tokenizer",
    "train_tokenizer",
]
