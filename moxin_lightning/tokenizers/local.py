"""`LocalTokenizer`: a SentencePiece BPE tokenizer trained on the built-in local corpus the first time it is used.

It lets the local overlay (`conf/local.yaml`) run with nothing downloaded: the corpus ships with Python
(`builtin:local`, see `moxin_lightning.data.builtin`) and training takes seconds. A small vocabulary also
keeps a tiny model's output head from dominating a CPU step. The trained model is cached (`first_use`).
"""

from __future__ import annotations

from pathlib import Path

from moxin_lightning.first_use import build_once, cached_folder
from moxin_lightning.tokenizers.sentencepiece import SentencePieceTokenizer


class LocalTokenizer(SentencePieceTokenizer):
    """SentencePiece BPE (byte fallback, Mistral's trainer settings) of `vocab_size` trained on `corpus`.

    Args:
        vocab_size: pieces in the vocabulary.
        corpus: what to train on, as `prepare --input` reads it (default: 3 MB of the built-in corpus).
    """

    def __init__(self, vocab_size: int = 4096, corpus: str = "builtin:local?max_mb=3") -> None:
        from moxin_lightning.data.builtin import cache_key
        from moxin_lightning.tokenizers.train import train_tokenizer

        folder = cached_folder("tokenizers", f"{cache_key(corpus)}-v{vocab_size}")

        def train(output: Path) -> None:
            train_tokenizer(corpus, vocab_size, output, progress=False, overwrite=True, minloglevel=2)

        what = f"training a {vocab_size:,}-piece tokenizer on {corpus}"
        build_once(folder, lambda f: (f / "tokenizer.model").is_file(), train, what=what)
        super().__init__(folder / "tokenizer.model")
        self.corpus = corpus
