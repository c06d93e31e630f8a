"""A decoding session: one sequence's rolling-buffer KV cache that lives across calls (the `generate` command).

`generate.generate` runs a batch from prompt to end in one call. A terminal session needs more: tokens shown
as they are sampled (`stream` is a generator), and in chat mode the conversation's cache kept between turns,
so each turn prefills only its new tokens (`feed`). Prefill, the decode step, the draw and the vocabulary guard
are `moxin_lightning.decoding`'s own, so a session decodes exactly as `generate` does. The session remembers
every token it has cached (`history`); `continue_with` keeps the longest cached prefix of a re-encoded
conversation and prefills the rest, and starts over only when the two diverge (e.g. a reply cut at the token
limit, which the template then closes with EOS) - a rolling buffer cannot rewind.

`TextStream` turns the token stream into text pieces: SentencePiece decodes a token differently depending on
its neighbours (the word-start space, multi-byte characters spelled in byte tokens), so it decodes the whole
reply each time and emits only the new, complete suffix.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from moxin_lightning.decoding import Sampling, check_request, decode_step, pick, prefill, within_vocabulary
from moxin_lightning.model.cache import RollingKVCache
from moxin_lightning.model.transformer import Transformer
from moxin_lightning.tokenizers import Tokenizer


class DecodeSession:
    """Feed token ids, then sample a continuation one token at a time, on one persistent KV cache."""

    def __init__(
        self,
        model: Transformer,
        *,
        vocab_limit: int | None = None,
        prefill_chunk: int | None = None,
        compile: bool = False,
    ) -> None:
        """vocab_limit: sample only ids below it - the tokenizer's size when the model's vocabulary is padded
        beyond it (ids past the tokenizer have no text)."""
        self.model = model
        self.vocab_limit = vocab_limit
        self.compile = compile
        self.prefill_chunk = prefill_chunk
        self.history: list[int] = []
        self._cache: RollingKVCache | None = None
        self._logits: torch.Tensor | None = None  # next-token logits after `history`
        self._pending: int | None = None  # sampled and shown, not yet run through the model

    @property
    def max_len(self) -> int:
        return self.model.config.max_seq_len

    def reset(self) -> None:
        self.history, self._cache, self._logits, self._pending = [], None, None, None

    @torch.inference_mode()
    def feed(self, ids: list[int]) -> None:
        """Append `ids` to the cached sequence (prefilled in chunks no longer than the cache)."""
        self._flush_pending()
        if not ids:
            return
        self._check_room(len(self.history) + len(ids))
        cache = self._ensure_cache()
        self._logits = prefill(self.model, [ids], cache, self.prefill_chunk or cache.slots, [len(self.history)])
        self.history.extend(ids)

    def continue_with(self, ids: list[int]) -> None:
        """Make the cached sequence equal `ids`: keep the common prefix when all of the cache is in it, else
        start over, then feed the rest."""
        self._flush_pending()
        shared = len(self.history)
        if ids[:shared] != self.history:
            self.reset()
            shared = 0
        self.feed(ids[shared:])

    @torch.inference_mode()
    def stream(
        self,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Yield sampled tokens as they are drawn; stops after `eos_id` (yielded) or `max_new_tokens`."""
        if self._logits is None:
            raise ValueError("feed the session a prompt (at least the BOS id) before sampling")
        self._flush_pending()
        sampling = Sampling(temperature, top_p, top_k, eos_id, self.vocab_limit)
        check_request([self.history], max_new_tokens, sampling, self.model.config.vocab_size)
        room = self.max_len - len(self.history)
        if room < 1:
            raise ValueError(f"the sequence already fills max_seq_len={self.max_len}; start a new one")
        for index in range(min(max_new_tokens, room)):
            logits = within_vocabulary(self._logits, self.vocab_limit)
            token = int(pick(logits, temperature, top_p, top_k, generator)[0])
            self._pending = token
            yield token
            if token == eos_id or index + 1 == min(max_new_tokens, room):
                return
            self._flush_pending()

    def _flush_pending(self) -> None:
        """Run the last sampled token through the model (lazily: the final token of a reply may never need it)."""
        if self._pending is None:
            return
        token, self._pending = self._pending, None
        cache = self._ensure_cache()
        device = next(self.model.parameters()).device
        positions = torch.tensor([[len(self.history)]], device=device)
        with torch.inference_mode():
            step = decode_step(self.model, self.compile)
            self._logits = step(torch.tensor([[token]], device=device), positions, cache.prepare(positions), cache)
            cache.commit()
        self.history.append(token)

    def _ensure_cache(self) -> RollingKVCache:
        if self._cache is None:
            param = next(self.model.parameters())
            self._cache = RollingKVCache(self.model.config, 1, dtype=param.dtype, device=param.device)
        return self._cache

    def _check_room(self, length: int) -> None:
        if length > self.max_len:
            raise ValueError(
                f"the sequence would reach {length} tokens, beyond max_seq_len={self.max_len}; "
                "shorten the prompt or start a new conversation"
            )


class TextStream:
    """Token ids in, newly complete text out (decoding the whole reply each time, after a little context)."""

    def __init__(self, tokenizer: Tokenizer, context: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        # The last prompt token, decoded with the reply, keeps the reply's first word-start space.
        self.context = list(context[-1:]) if context else []
        self.prefix = tokenizer.decode(self.context) if self.context else ""
        self.ids: list[int] = []
        self.shown = ""

    def add(self, token: int) -> str:
        """The text that `token` completes ('' while a multi-byte character is still partial)."""
        if token == self.tokenizer.eos_id:
            return ""
        self.ids.append(token)
        text = self._text()
        if text.endswith("\ufffd"):  # a character spelled in byte tokens, not finished yet
            return ""
        new = text[len(self.shown) :] if text.startswith(self.shown) else ""
        self.shown = text if text.startswith(self.shown) else self.shown
        return new

    def _text(self) -> str:
        full = self.tokenizer.decode(self.context + self.ids)
        return full[len(self.prefix) :] if full.startswith(self.prefix) else self.tokenizer.decode(self.ids)
