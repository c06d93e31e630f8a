"""Chat templates: a conversation (`messages`) -> token ids, and which of them the model is trained to produce.

A template is a swappable component of the chat data (`moxin_lightning.datamodules.ChatData`) and of generation:
whatever lays out the turns, training and inference must encode a prompt identically, so both go through `encode`.

Templates encode text *pieces* separately (`tokenizer.encode(piece, bos=False, eos=False)`) and insert special
ids (BOS, EOS) as ids, never as text. A piece is a maximal run of the conversation's text that is either all
prompt or all assistant content, so the trained/untrained boundary always falls between tokens (a token never
straddles a user turn and an assistant reply), and a prompt encodes to the same ids whether or not a reply
follows it. The cost: a SentencePiece tokenizer with a dummy prefix (Mistral's, Moxin's) starts every piece with
a word-start marker, so `decode(encode(...))` is not the template text byte for byte.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from moxin_lightning.tokenizers.base import Tokenizer

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLES = (SYSTEM, USER, ASSISTANT)


@runtime_checkable
class ChatTemplate(Protocol):
    """Lays out a conversation as token ids.

    `encode` returns the ids (starting with BOS) and, for each id, whether it is trained: True exactly for the
    tokens the assistant produces (its replies and the EOS that ends each reply). With `add_generation_prompt`
    the ids end with the header that asks the model for the next assistant turn.
    """

    name: str

    def encode(
        self, tokenizer: Tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]: ...


class TuluTemplate:
    """The Tülu / open-instruct layout (Tülu 3 SFT and DPO, Moxin-Instruct):

        <|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{reply}</s>\\n<|user|>\\n...<|assistant|>\\n{reply}</s>

    Each assistant reply ends with the EOS id; a newline separates it from the next turn. Trained: each reply and
    its EOS. Unlike open-instruct, which also trains the newline after a non-final EOS, that newline counts as
    prompt here: a model never needs to produce anything after its EOS.
    """

    name = "tulu"

    def __repr__(self) -> str:
        return "TuluTemplate()"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TuluTemplate)

    def __hash__(self) -> int:
        return hash(self.name)

    def encode(
        self, tokenizer: Tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        ids, trained = [tokenizer.bos_id], [False]
        prompt = ""  # prompt text not encoded yet: it grows until an assistant reply starts

        def flush(text: str, is_trained: bool) -> None:
            if text:
                piece = tokenizer.encode(text, bos=False, eos=False)
                ids.extend(piece)
                trained.extend([is_trained] * len(piece))

        for index, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES or not isinstance(content, str):
                raise ValueError(
                    f"message {index} has role {role!r} and content of type {type(content).__name__}; "
                    f"the Tülu template needs role in {ROLES} and string content"
                )
            if role == ASSISTANT:
                flush(prompt + "<|assistant|>\n", False)
                flush(content, True)
                ids.append(tokenizer.eos_id)
                trained.append(True)
                prompt = "\n"
            else:
                prompt += f"<|{role}|>\n{content}\n"
        if add_generation_prompt:
            prompt += "<|assistant|>\n"
        if prompt != "\n":  # the newline after a final reply is not part of the conversation
            flush(prompt, False)
        return ids, trained


TULU = TuluTemplate()
