"""The refusals ChatData and PreferenceData share: arguments that cannot work, and a model they cannot feed.

Both tokenize conversations with the model's tokenizer into sequences of at most `max_length` tokens, so both
refuse the same mistakes, in the same words, before any data is read or any step is trained.
"""

from __future__ import annotations

from typing import Any

from moxin_lightning.tokenizers import Tokenizer


def check_arguments(
    owner: str,
    train: list[str],
    val: list[str] | None,
    val_fraction: float,
    tokenizer: Tokenizer | None,
    max_length: int,
    batch_size: int,
    *,
    inputs: str,
    two_tokens: str,
) -> None:
    """ValueError (one line) for arguments that cannot work. `owner` names the datamodule in the messages,
    `inputs` says what `train` may list and `two_tokens` why a sequence needs at least two tokens."""
    if tokenizer is None:
        raise ValueError(f"{owner} needs the model's tokenizer: set data.tokenizer (e.g. a LocalTokenizer)")
    if not train:
        raise ValueError(f"{owner} needs at least one {inputs} in `train`")
    if val is not None and val_fraction > 0:
        raise ValueError(f"set either val files or val_fraction={val_fraction}, not both")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be at least 2 ({two_tokens})")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")


def model_limits(
    trainer: Any, max_length: int, tokenizer: Tokenizer, max_seq_len: int | None, vocab_size: int | None
) -> tuple[int | None, int | None]:
    """The model's (max_seq_len, vocab_size): as given, else from the attached task's `model_config`.

    ValueError when `max_length` exceeds the model's context or the tokenizer has ids the model's embedding
    lacks: both would fail mid-step otherwise, far from the setting to change.
    """
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    config = getattr(module, "model_config", None)
    if config is not None:
        max_seq_len = max_seq_len or config.max_seq_len
        vocab_size = vocab_size or config.vocab_size
    if max_seq_len is not None and max_length > max_seq_len:
        raise ValueError(f"max_length={max_length} exceeds the model's max_seq_len={max_seq_len}; lower max_length")
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{vocab_size}; use the model's tokenizer"
        )
    return max_seq_len, vocab_size
