"""The script router of the MoE tokenizer: which expert a piece of text goes to.

Text is cut into maximal runs of one script class, CJK or not, and each run is tokenized by that class's
expert. Spaces (U+0020) between two CJK characters belong to the CJK run: Korean separates words with
spaces, and a CJK expert that sees them learns word pieces with their leading space (like the base model's
"▁word") instead of paying one base-expert token per space.

The same function feeds the CJK expert at training time (`train_tokenizer(expert="cjk")`) and routes text at
encoding time, so the expert only ever sees the kind of text it was trained on. `ROUTING_VERSION` is part of
the MoE tokenizer's fingerprint: change it whenever the rules below change, because the same text would then
encode to different ids.
"""

from __future__ import annotations

import re

ROUTING_VERSION = 1

BASE = "base"
CJK = "cjk"

# Unicode blocks routed to the CJK expert. Everything else (Latin, code, digits, emoji, other scripts) goes to
# the base expert. Fullwidth Latin letters and digits (U+FF00 block) count as CJK: they occur in CJK text.
_CJK_RANGES = (
    ("\u1100", "\u11ff"),  # Hangul Jamo
    ("\u2e80", "\u2fdf"),  # CJK Radicals Supplement, Kangxi Radicals
    ("\u2ff0", "\u2fff"),  # Ideographic Description Characters
    ("\u3000", "\u303f"),  # CJK Symbols and Punctuation (ideographic space, 、。「」)
    ("\u3040", "\u30ff"),  # Hiragana, Katakana
    ("\u3100", "\u312f"),  # Bopomofo
    ("\u3130", "\u318f"),  # Hangul Compatibility Jamo
    ("\u3190", "\u31ff"),  # Kanbun, Bopomofo Extended, CJK Strokes, Katakana Phonetic Extensions
    ("\u3200", "\u33ff"),  # Enclosed CJK Letters and Months, CJK Compatibility
    ("\u3400", "\u4dbf"),  # CJK Unified Ideographs Extension A
    ("\u4e00", "\u9fff"),  # CJK Unified Ideographs
    ("\ua960", "\ua97f"),  # Hangul Jamo Extended-A
    ("\uac00", "\ud7af"),  # Hangul Syllables
    ("\ud7b0", "\ud7ff"),  # Hangul Jamo Extended-B
    ("\uf900", "\ufaff"),  # CJK Compatibility Ideographs
    ("\ufe30", "\ufe4f"),  # CJK Compatibility Forms
    ("\uff00", "\uffef"),  # Halfwidth and Fullwidth Forms
    ("\U0001aff0", "\U0001b16f"),  # Kana Extended-B, Kana Supplement, Kana Extended-A, Small Kana Extension
    ("\U00020000", "\U0003ffff"),  # Supplementary and Tertiary Ideographic Planes (Extensions B-H, compat.)
)
_CJK_CLASS = "".join(f"{start}-{end}" for start, end in _CJK_RANGES)
_CJK_CHARS = re.compile(f"[{_CJK_CLASS}]+")
_CJK_RUN = re.compile(f"[{_CJK_CLASS}]+(?: +[{_CJK_CLASS}]+)*")
_SPLIT = re.compile(f"({_CJK_RUN.pattern})")


def is_cjk(char: str) -> bool:
    """Whether one character is routed to the CJK expert."""
    return len(char) == 1 and _CJK_CHARS.fullmatch(char) is not None


def has_cjk(text: str) -> bool:
    return _CJK_CHARS.search(text) is not None


def cjk_runs(text: str) -> list[str]:
    """The maximal CJK runs of `text`, in order: what the CJK expert is trained on."""
    return _CJK_RUN.findall(text)


def route(text: str) -> list[tuple[str, str]]:
    """`text` as consecutive (expert, run) pairs; runs are non-empty and neighbours have different experts."""
    parts = _SPLIT.split(text)  # alternates non-CJK, CJK, non-CJK, ...; the non-CJK parts may be empty
    return [((CJK if index % 2 else BASE), part) for index, part in enumerate(parts) if part]
