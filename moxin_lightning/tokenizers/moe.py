"""The MoE tokenizer: one joint vocabulary, text routed by script to expert SentencePiece models.

Moxin advertises a "Mixture-of-Experts tokenizer" for Chinese, Japanese and Korean, but nothing public
(paper, code, configs, model cards) specifies it; the released Moxin models use the single 32K vocabulary.
This is our design, not a reproduction:

- A router (`moxin_lightning.tokenizers.router`) cuts text into maximal runs that are CJK (Han incl.
  extensions, kana, Hangul, bopomofo, CJK punctuation, fullwidth forms; spaces between two CJK characters
  included, for Korean word spacing) or not.
- Each run goes to its expert: the base 32K model for Latin text and code, a CJK expert trained with
  `train_tokenizer(..., expert="cjk")` for CJK runs.
- Expert ids live in consecutive ranges of one joint vocabulary: base [0, Vb), cjk [Vb, Vb + Vc). Decoding
  splits the ids into runs by range and lets each expert decode its own run.
- Text with no CJK character encodes to exactly the base tokenizer's ids, so base-vocabulary data and
  checkpoints stay valid (`extend_vocabulary` grows a checkpoint to the joint size).

Dummy prefix. A Mistral-style model puts a space (the "dummy prefix") in front of the text it encodes, and
its decoder removes it. The MoE tokenizer keeps that for the first run of a text only (so text without CJK
gets exactly the base ids) and encodes every later run without it, as the base model would inside running
text: "世界 hello" is [世界] + [▁hello], not [世界] + [▁, ▁hello]. The no-prefix variant of an expert is the
same model with the one flag switched off (see `_without_dummy_prefix`). `decode` mirrors this: it removes
one leading space from the first run only, exactly like SentencePiece's own decode.

U+2581. SentencePiece reads a literal U+2581 ("▁", its whitespace marker) in the input as a space, so it
would come back as " ". A piece whose source text holds U+2581 is therefore spelled with byte-fallback tokens
(the raw UTF-8 bytes, which `decode` turns back into U+2581). Only text containing U+2581 gets ids that differ
from the base tokenizer's; with that, `decode(encode(s)) == s` holds for every string.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sentencepiece as spm

from moxin_lightning.tokenizers.router import BASE, CJK, ROUTING_VERSION, route
from moxin_lightning.tokenizers.sentencepiece import SentencePieceTokenizer

LAYOUT_FILE = "moe_tokenizer.json"
EXPERT_ORDER = (CJK,)  # joint-vocabulary order after the base; a new expert is appended, never inserted
META = "\u2581"  # SentencePiece's whitespace marker
UNK_SURFACE = " \u2047 "  # what SentencePiece prints for <unk> (its default unk_surface)


def _without_dummy_prefix(model: bytes) -> bytes:
    """A serialized SentencePiece ModelProto with `normalizer_spec.add_dummy_prefix` set to false.

    Protobuf merges a repeated occurrence of an embedded message field into the first, so appending
    field 3 (normalizer_spec, length 2) holding field 3 (add_dummy_prefix, varint 0) changes that one flag
    and nothing else, without needing the protobuf package.
    """
    return model + b"\x1a\x02\x18\x00"


@dataclass
class _Expert:
    """One expert model, its place in the joint vocabulary, and a table id -> UTF-8 bytes for decoding."""

    name: str
    tokenizer: SentencePieceTokenizer
    offset: int
    dummy_prefix: bool = field(init=False)
    inner: spm.SentencePieceProcessor = field(init=False, repr=False)  # encodes runs after the first
    piece_bytes: list[bytes] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        processor = self.tokenizer.processor
        retrain = "train it with train_tokenizer(...) (its defaults provide them)"
        if not processor.is_byte(processor.piece_to_id("<0x00>")):
            raise ValueError(
                f"{self.name} model {self.tokenizer.path} has no byte-fallback pieces, so text outside its "
                f"vocabulary could not round-trip; {retrain}"
            )
        if processor.is_unknown(processor.piece_to_id(META)):
            raise ValueError(
                f"{self.name} model {self.tokenizer.path} has no {META!r} piece, so a space would decode as "
                f"U+2581; {retrain}"
            )
        # A model trained with add_dummy_prefix starts every encoding with the whitespace marker.
        self.dummy_prefix = processor.encode("a", out_type=str)[0].startswith(META)
        self.inner = processor
        if self.dummy_prefix:
            self.inner = spm.SentencePieceProcessor(
                model_proto=_without_dummy_prefix(processor.serialized_model_proto())
            )
        self.piece_bytes = [self._bytes_of(index) for index in range(self.size)]

    @property
    def size(self) -> int:
        return self.tokenizer.vocab_size

    def _bytes_of(self, index: int) -> bytes:
        processor = self.tokenizer.processor
        piece = processor.id_to_piece(index)
        if processor.is_byte(index):
            return bytes([int(piece[3:5], 16)])  # "<0xAB>"
        if processor.is_unknown(index):
            return UNK_SURFACE.encode()
        if processor.is_control(index) or processor.is_unused(index):
            return b""
        return piece.replace(META, " ").encode()

    def encode(self, run: str, first: bool) -> list[int]:
        """Ids of one run; `first`: the run opens the text and gets the dummy prefix (if the model has one)."""
        processor = self.tokenizer.processor if first else self.inner
        if META not in run:
            ids = processor.encode(run)
        else:
            ids = []
            for piece in processor.encode(run, out_type="proto").pieces:
                if META not in piece.surface:
                    ids.append(piece.id)
                    continue
                # The piece reads a literal U+2581 as a space: spell its source text in bytes instead, after
                # the dummy-prefix marker when the piece carries it (one more character than its source text).
                if not processor.is_byte(piece.id) and len(piece.piece) == len(piece.surface) + 1:
                    ids.append(processor.piece_to_id(META))
                ids.extend(processor.piece_to_id(f"<0x{byte:02X}>") for byte in piece.surface.encode())
        return [index + self.offset for index in ids] if self.offset else ids

    def decode(self, local_ids: list[int], first: bool) -> str:
        """Text of one run; `first`: the run opens the sequence, so its dummy-prefix space is removed."""
        text = b"".join(self.piece_bytes[index] for index in local_ids).decode("utf-8", errors="replace")
        return text[1:] if first and self.dummy_prefix and text.startswith(" ") else text


class MoETokenizer:
    """Script-routed tokenizer over one joint vocabulary (see the module docstring for the design).

    base: the base SentencePiece `tokenizer.model` (or its folder): ids [0, Vb), and <s>, </s>, pad.
    experts: expert name -> its SentencePiece model (or folder), e.g. {"cjk": "tokenizers/cjk"}.
    """

    def __init__(self, base: str | Path, experts: dict[str, str | Path]) -> None:
        unknown = sorted(set(experts) - set(EXPERT_ORDER))
        if unknown:
            names = ", ".join(map(repr, unknown))
            raise ValueError(f"unknown expert(s) {names}; the router knows: {', '.join(EXPERT_ORDER)}")
        self.base = SentencePieceTokenizer(base)
        self.experts = [_Expert(BASE, self.base, 0)]
        for name in EXPERT_ORDER:
            if name in experts:
                tokenizer = SentencePieceTokenizer(experts[name])
                if tokenizer.fingerprint == self.base.fingerprint:
                    raise ValueError(
                        f"expert {name!r} is the base model itself; train it with train_tokenizer(..., expert={name!r})"
                    )
                self.experts.append(_Expert(name, tokenizer, self.experts[-1].offset + self.experts[-1].size))
        self._by_name = {expert.name: expert for expert in self.experts}
        self._starts = [expert.offset for expert in self.experts]
        digest = hashlib.sha256(f"moe-tokenizer routing v{ROUTING_VERSION}\n".encode())
        for expert in self.experts:
            digest.update(f"{expert.name}:{expert.offset}:{expert.size}\n".encode())
            digest.update(expert.tokenizer.path.read_bytes())
        self._fingerprint = digest.hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.experts[-1].offset + self.experts[-1].size

    @property
    def bos_id(self) -> int:
        return self.base.bos_id

    @property
    def eos_id(self) -> int:
        return self.base.eos_id

    @property
    def pad_id(self) -> int:
        return self.base.pad_id

    @property
    def fingerprint(self) -> str:
        """sha256 over the routing version, the joint layout and every expert model file."""
        return self._fingerprint

    @property
    def layout(self) -> list[dict[str, Any]]:
        """Each expert's name and id range [offset, offset + size) in the joint vocabulary."""
        return [{"name": e.name, "offset": e.offset, "size": e.size} for e in self.experts]

    def expert_of(self, token_id: int) -> str:
        """The expert whose range holds `token_id`."""
        return self._expert_at(token_id).name

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self.bos_id] if bos else []
        if len(self.experts) == 1:  # no expert but the base: no routing, the whole text is one run
            ids += self.experts[0].encode(text, first=True)
        else:
            for index, (name, run) in enumerate(route(text)):
                ids += self._by_name[name].encode(run, first=index == 0)
        return ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: list[int]) -> str:
        parts: list[str] = []
        start = 0
        while start < len(ids):
            expert = self._expert_at(ids[start])
            end = start + 1
            while end < len(ids) and expert.offset <= ids[end] < expert.offset + expert.size:
                end += 1
            parts.append(expert.decode([index - expert.offset for index in ids[start:end]], first=start == 0))
            start = end
        return "".join(parts)

    def _expert_at(self, token_id: int) -> _Expert:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the joint vocabulary [0, {self.vocab_size})")
        return self.experts[bisect.bisect_right(self._starts, token_id) - 1]

    def save(self, directory: str | Path) -> None:
        """Write every expert model as `tokenizer_<name>.model` plus `moe_tokenizer.json` (the joint layout).

        There is deliberately no plain `tokenizer.model`: a loader that only knows single SentencePiece models
        (or Hugging Face) then fails instead of silently decoding the joint ids with the base vocabulary alone.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        experts = []
        for expert in self.experts:
            name = f"tokenizer_{expert.name}.model"
            if (directory / name).resolve() != expert.tokenizer.path.resolve():  # saving over its own folder
                shutil.copyfile(expert.tokenizer.path, directory / name)
            experts.append({"name": expert.name, "file": name, "offset": expert.offset, "size": expert.size})
        layout = {
            "format": "moxin-moe-tokenizer",
            "routing_version": ROUTING_VERSION,
            "vocab_size": self.vocab_size,
            "experts": experts,
            "fingerprint": self.fingerprint,
        }
        (directory / LAYOUT_FILE).write_text(json.dumps(layout, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> MoETokenizer:
        """Read a folder written by `save`, checking that its files still match the recorded layout."""
        directory = Path(directory)
        path = directory / LAYOUT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; pass a folder written by MoETokenizer.save")
        layout = json.loads(path.read_text())
        if layout.get("routing_version") != ROUTING_VERSION:
            raise ValueError(
                f"{path} was made with routing version {layout.get('routing_version')}, this code routes with "
                f"version {ROUTING_VERSION}; re-create the tokenizer (and its data) with this version"
            )
        entries = layout["experts"]
        if not entries or entries[0]["name"] != BASE or entries[0]["offset"] != 0:
            raise ValueError(f"{path}: the first expert must be 'base' at offset 0; re-save the tokenizer")
        for previous, entry in zip(entries, entries[1:], strict=False):
            end = previous["offset"] + previous["size"]
            if entry["offset"] != end:
                problem = "overlaps" if entry["offset"] < end else "leaves a gap after"
                raise ValueError(
                    f"{path}: expert {entry['name']!r} at offset {entry['offset']} {problem} {previous['name']!r} "
                    f"[{previous['offset']}, {end}); expert ranges must be consecutive, re-save the tokenizer"
                )
        tokenizer = cls(
            directory / entries[0]["file"], {entry["name"]: directory / entry["file"] for entry in entries[1:]}
        )
        if tokenizer.layout != [{key: entry[key] for key in ("name", "offset", "size")} for entry in entries]:
            raise ValueError(f"{path}: the model files no longer match the recorded layout; re-save the tokenizer")
        return tokenizer
