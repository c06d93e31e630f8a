"""Tokenizer training, the script-routed MoE tokenizer and vocabulary extension.

The base tokenizer is Mistral-7B's 32K SentencePiece model shipped inside the `mistral_common` wheel; the
CJK expert is trained here, in seconds, on the gettext catalogues of the image (/usr/share/locale).
"""

from __future__ import annotations

import argparse
import gettext
import importlib.resources
import io
import json
import zlib
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moxin_lightning.tokenizers import MoETokenizer, SentencePieceTokenizer, extend_vocabulary, train_tokenizer
from moxin_lightning.tokenizers.moe import LAYOUT_FILE
from moxin_lightning.tokenizers.router import BASE, CJK, cjk_runs, has_cjk, is_cjk, route
from moxin_lightning.tokenizers.train import register

from .conftest import tiny_model

BASE_MODEL = Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
LOCALES = ("zh_CN", "zh_TW", "ja", "ko")
LOCALE_DIR = Path("/usr/share/locale")
QUIET = dict(minloglevel=2, progress=False)


def catalogue_texts() -> tuple[list[str], list[str]]:
    """Translated UI strings holding CJK, split deterministically by catalogue name into (train, held_out).

    A quarter of the catalogue names (by crc32) are held out in every locale, so no translation of a
    held-out catalogue, in any of the four languages, is seen in training.
    """
    train: list[str] = []
    held_out: list[str] = []
    for locale in LOCALES:
        files = sorted((LOCALE_DIR / locale / "LC_MESSAGES").glob("*.mo"))
        if not files:
            pytest.fail(f"no gettext catalogues in {LOCALE_DIR / locale}/LC_MESSAGES; the test image ships them")
        kept = {"train": 0, "held_out": 0}
        for path in files:
            with open(path, "rb") as handle:
                strings = [text for text in gettext.GNUTranslations(handle)._catalog.values() if has_cjk(text)]
            side = "held_out" if zlib.crc32(path.name.encode()) % 4 == 0 else "train"
            limit = 10_000 if side == "train" else 2_000  # per locale: keeps the test a couple of seconds
            strings = strings[: max(0, limit - kept[side])]
            kept[side] += len(strings)
            (held_out if side == "held_out" else train).extend(strings)
    return train, held_out


@pytest.fixture(scope="session")
def base() -> SentencePieceTokenizer:
    return SentencePieceTokenizer(BASE_MODEL)


@pytest.fixture(scope="session")
def catalogues() -> tuple[list[str], list[str]]:
    return catalogue_texts()


@pytest.fixture(scope="session")
def cjk_expert(tmp_path_factory, catalogues) -> Path:
    train, _ = catalogues
    return train_tokenizer(iter(train), 12_000, tmp_path_factory.mktemp("experts") / "cjk", expert="cjk", **QUIET)


@pytest.fixture(scope="session")
def moe(cjk_expert) -> MoETokenizer:
    return MoETokenizer(str(BASE_MODEL), {"cjk": str(cjk_expert)})


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


ENGLISH = "The quick brown fox jumps over the lazy dog 12345 times.\n" * 20 + "def f(x):\n    return x + 1\n" * 20


# ---------------------------------------------------------------- router


def test_router_classifies_every_cjk_block():
    cjk = "中𠀀𪜀あアｱ한ᄀㄱㄅ。「」\u3000Ａ１㈱⺀豈"  # Han, ext. B/C, kana, halfwidth, Hangul, jamo, bopomofo, ...
    assert [c for c in cjk if not is_cjk(c)] == []
    other = "aZé9 ▁\t\nЖαא😀€—…"
    assert [c for c in other if is_cjk(c)] == []


def test_router_cuts_maximal_runs_and_keeps_spaces_between_cjk():
    assert route("Hello世界, 한국어 단어 ok 日本 ") == [
        (BASE, "Hello"),
        (CJK, "世界"),
        (BASE, ", "),
        (CJK, "한국어 단어"),
        (BASE, " ok "),
        (CJK, "日本"),
        (BASE, " "),
    ]
    assert cjk_runs("a 中  文 b") == ["中  文"]
    assert route("") == []


@given(st.text())
def test_router_runs_partition_the_text(text):
    runs = route(text)
    assert "".join(run for _, run in runs) == text
    assert all(run for _, run in runs)
    assert all(a[0] != b[0] for a, b in zip(runs, runs[1:], strict=False))


# ---------------------------------------------------------------- MoE tokenizer: round trip and base identity


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_decode_inverts_encode_for_any_string(moe, text):
    assert moe.decode(moe.encode(text)) == text


ROUND_TRIP_CASES = [
    "",
    " ",
    "   ",
    "  leading and trailing  ",
    "a\tb\nc\r\nd\n\n",
    "emoji 😀👍🏽 and € ©",
    "中文 English 混合 text。",
    "世界 hello",
    "hello 世界",
    "한국어 단어 사이 공백",
    "日本語のテキスト、カタカナ。",
    "\u3000全角スペース\u3000",
    "\u2581",
    "\u2581\u2581 x",
    "a\u2581b",
    " \u2581the end\u2581",
    "中\u2581文",
    "\x00\x01 control",
    "𠀀𪜀 rare Han",
]


@pytest.mark.parametrize("text", ROUND_TRIP_CASES)
def test_round_trip_examples(moe, text):
    assert moe.decode(moe.encode(text)) == text
    assert moe.decode(moe.encode(text, bos=True, eos=True)) == text


def _no_cjk_char(char: str) -> bool:
    return not is_cjk(char) and char != "\u2581"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)).filter(_no_cjk_char)))
def test_text_without_cjk_gets_exactly_the_base_ids(moe, base, text):
    assert moe.encode(text) == base.encode(text)
    assert moe.encode(text, bos=True, eos=True) == base.encode(text, bos=True, eos=True)


def test_realistic_latin_text_and_code_get_the_base_ids(moe, base):
    assert moe.encode(ENGLISH) == base.encode(ENGLISH)
    assert moe.decode(base.encode(ENGLISH)) == base.decode(base.encode(ENGLISH)) == ENGLISH


def test_joint_vocabulary_layout(moe, base):
    cjk_size = SentencePieceTokenizer(moe.experts[1].tokenizer.path).vocab_size
    assert cjk_size == 12_000
    assert moe.vocab_size == 32_000 + 12_000
    assert moe.layout == [
        {"name": "base", "offset": 0, "size": 32_000},
        {"name": "cjk", "offset": 32_000, "size": 12_000},
    ]
    assert (moe.bos_id, moe.eos_id, moe.pad_id) == (1, 2, 0) == (base.bos_id, base.eos_id, base.pad_id)
    cjk_ids = moe.encode("世界和平")
    assert cjk_ids and all(32_000 <= i < 44_000 for i in cjk_ids)
    assert {moe.expert_of(i) for i in cjk_ids} == {"cjk"}
    assert moe.encode("世界和平", bos=True, eos=True) == [1, *cjk_ids, 2]


def test_later_runs_have_no_dummy_prefix(moe, base):
    """Only the first run gets SentencePiece's dummy-prefix space; later runs encode as inside running text."""
    cjk_ids = moe.encode("世界")
    assert moe.encode("世界 hello") == cjk_ids + base.encode(" hello")[1:]  # base: ['▁', '▁hell', 'o']
    assert base.encode(" hello")[0] == base.processor.piece_to_id("\u2581")
    assert moe.encode("hello世界") == base.encode("hello") + cjk_ids


def test_u2581_is_spelled_in_bytes(moe, base):
    """A literal U+2581 cannot use the '▁' pieces (they decode to a space), so it becomes bytes E2 96 81."""
    byte_ids = [base.processor.piece_to_id(f"<0x{b:02X}>") for b in "\u2581".encode()]
    assert byte_ids == [229, 153, 132]
    assert moe.encode("a\u2581") == base.encode("a") + byte_ids
    assert base.decode(base.encode("a\u2581")) == "a "  # what plain SentencePiece does
    assert moe.decode(moe.encode("a\u2581")) == "a\u2581"


def test_decode_rejects_ids_outside_the_joint_vocabulary(moe):
    with pytest.raises(ValueError, match=r"token id 44000 is outside the joint vocabulary \[0, 44000\)"):
        moe.decode([5, 44_000])


# ---------------------------------------------------------------- compression on held-out CJK text


def test_cjk_expert_needs_far_fewer_tokens_on_held_out_text(moe, base, catalogues):
    _, held_out = catalogues
    characters = sum(len(text) for text in held_out)
    base_tokens = sum(len(base.encode(text)) for text in held_out)
    moe_tokens = sum(len(moe.encode(text)) for text in held_out)
    base_rate, moe_rate = base_tokens / characters, moe_tokens / characters
    print(f"held-out CJK: {characters} chars; tokens/char base {base_rate:.3f}, MoE {moe_rate:.3f}")
    assert len(held_out) > 5_000 and characters > 100_000
    assert base_rate / moe_rate >= 1.5, (base_rate, moe_rate)


# ---------------------------------------------------------------- save / load / fingerprint


def test_save_and_load_round_trip(moe, tmp_path):
    moe.save(tmp_path / "tok")
    names = sorted(p.name for p in (tmp_path / "tok").iterdir())
    assert names == [LAYOUT_FILE, "tokenizer_base.model", "tokenizer_cjk.model"]
    assert (tmp_path / "tok" / "tokenizer_base.model").read_bytes() == BASE_MODEL.read_bytes()
    loaded = MoETokenizer.load(tmp_path / "tok")
    assert loaded.fingerprint == moe.fingerprint
    assert loaded.layout == moe.layout
    text = "Mixed 中文 and 한국어, ok."
    assert loaded.encode(text) == moe.encode(text)
    with pytest.raises(FileNotFoundError, match="tokenizer.model not found"):
        SentencePieceTokenizer(tmp_path / "tok")  # no plain tokenizer.model: a base-only loader cannot misread it
    loaded.save(tmp_path / "tok")  # over the folder it was loaded from
    assert MoETokenizer.load(tmp_path / "tok").fingerprint == moe.fingerprint


def test_fingerprint_covers_every_expert_file(moe, base, tmp_path):
    texts = iter(["中文文本测试", "日本語テキスト"] * 30)
    other = train_tokenizer(texts, 280, tmp_path / "cjk2", expert="cjk", hard_vocab_limit=False, **QUIET)
    assert MoETokenizer(BASE_MODEL, {"cjk": other}).fingerprint != moe.fingerprint
    assert MoETokenizer(BASE_MODEL, {}).fingerprint != base.fingerprint  # routing version is hashed too
    assert MoETokenizer(BASE_MODEL, {}).encode("中文 x") == base.encode("中文 x")  # no expert: no routing


def test_load_refuses_a_layout_with_overlapping_experts(moe, tmp_path):
    moe.save(tmp_path / "tok")
    layout = json.loads((tmp_path / "tok" / LAYOUT_FILE).read_text())
    layout["experts"][1]["offset"] = 31_000
    (tmp_path / "tok" / LAYOUT_FILE).write_text(json.dumps(layout))
    with pytest.raises(ValueError, match=r"expert 'cjk' at offset 31000 overlaps 'base' \[0, 32000\)") as error:
        MoETokenizer.load(tmp_path / "tok")
    assert "\n" not in str(error.value)
    layout["experts"][1]["offset"], layout["routing_version"] = 32_000, 99
    (tmp_path / "tok" / LAYOUT_FILE).write_text(json.dumps(layout))
    with pytest.raises(ValueError, match="routing version 99, this code routes with version 1"):
        MoETokenizer.load(tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="moe_tokenizer.json not found; pass a folder written by"):
        MoETokenizer.load(tmp_path)


def test_bad_experts_are_refused_with_the_fix(cjk_expert, tmp_path):
    with pytest.raises(ValueError, match=r"unknown expert\(s\) 'thai'; the router knows: cjk"):
        MoETokenizer(BASE_MODEL, {"thai": cjk_expert})
    with pytest.raises(ValueError, match=r"expert 'cjk' is the base model itself; train it with train_tokenizer"):
        MoETokenizer(BASE_MODEL, {"cjk": BASE_MODEL})
    with pytest.raises(
        FileNotFoundError, match="missing not found; pass a SentencePiece tokenizer.model or its folder"
    ):
        MoETokenizer(BASE_MODEL, {"cjk": tmp_path / "missing"})
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["中文 文本"] * 20), model_writer=buffer, vocab_size=20, model_type="bpe",
        byte_fallback=False, minloglevel=2, hard_vocab_limit=False,
    )  # fmt: skip
    (tmp_path / "nobytes").mkdir()
    (tmp_path / "nobytes" / "tokenizer.model").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="cjk model .* has no byte-fallback pieces, so text outside its vocabulary"):
        MoETokenizer(BASE_MODEL, {"cjk": tmp_path / "nobytes"})


# ---------------------------------------------------------------- train_tokenizer


def test_train_base_tokenizer_like_mistral(tmp_path, capsys):
    write(tmp_path / "data" / "a.txt", ENGLISH)
    records = [{"text": "jsonl text   with  spaces\tand tabs 2024"}, {"text": "second record", "id": 7}]
    write(tmp_path / "data" / "b.jsonl", "".join(json.dumps(record) + "\n" for record in records))
    out = train_tokenizer([str(tmp_path / "data" / "*.txt"), str(tmp_path / "data" / "*.jsonl")], 400,
                          tmp_path / "tok", minloglevel=2)  # fmt: skip
    tok = SentencePieceTokenizer(out)
    assert tok.vocab_size == 400
    processor = tok.processor
    assert [processor.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert (processor.unk_id(), processor.bos_id(), processor.eos_id(), processor.pad_id()) == (0, 1, 2, -1)
    assert processor.encode("2024", out_type=str) == ["\u2581", "2", "0", "2", "4"]  # digits split
    text = "  two spaces,\ttab and ünïcödé ∑ 中\n"
    assert tok.decode(tok.encode(text)) == text  # identity normalization, no whitespace removal, byte fallback

    info = json.loads((out / "tokenizer_info.json").read_text())
    assert [Path(i["path"]).name for i in info["inputs"]] == ["a.txt", "b.jsonl"]
    sizes = [(tmp_path / "data" / name).stat().st_size for name in ("a.txt", "b.jsonl")]
    assert [i["bytes"] for i in info["inputs"]] == sizes
    assert info["sentences"] == 60 + 2 and info["expert"] is None and info["vocab_size"] == 400
    assert info["options"]["split_digits"] is True and info["options"]["normalization_rule_name"] == "identity"
    assert info["sentencepiece_version"] == spm.__version__ and info["created"][:2] == "20"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "tok"]  # no temporary folder left behind
    err = capsys.readouterr().err
    characters = sum(map(len, ENGLISH.splitlines())) + sum(len(r["text"]) for r in records)
    assert characters == 1672 and info["characters"] == characters
    assert "train-tokenizer: 62 sentences (1,672 characters) read; training" in err
    assert f"train-tokenizer: wrote {out / 'tokenizer.model'} (400 pieces)" in err


def test_train_cjk_expert_sees_only_cjk_runs(tmp_path):
    lines = ["The file 文件 was not found 未找到", "한국어 단어 error code 42", "日本語 text カタカナ"] * 40
    out = train_tokenizer(iter(lines), 280, tmp_path / "cjk", expert="cjk", hard_vocab_limit=False, **QUIET)
    processor = SentencePieceTokenizer(out).processor
    assert (processor.unk_id(), processor.bos_id(), processor.eos_id(), processor.pad_id()) == (0, -1, -1, -1)
    learned = [processor.id_to_piece(i) for i in range(processor.get_piece_size()) if not processor.is_byte(i)]
    assert not any(c.isascii() and c.isalnum() for piece in learned[1:] for c in piece)  # no Latin, no digits
    # The space inside "한국어 단어" is part of the run: the expert spells it with its own '▁' pieces.
    assert any("\u2581" in piece for piece in processor.encode("한국어 단어", out_type=str))
    assert processor.encode("文件", out_type=str)[0] != "\u2581"  # no dummy prefix of its own
    info = json.loads((out / "tokenizer_info.json").read_text())
    assert (info["expert"], info["routing_version"], info["sentences"]) == ("cjk", 1, 5 * 40)
    assert info["inputs"] == [{"iterator": "list_iterator"}]


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    write(tmp_path / "a.txt", ENGLISH)
    first = train_tokenizer(str(tmp_path / "a.txt"), 300, tmp_path / "tok", **QUIET)
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        train_tokenizer(str(tmp_path / "a.txt"), 320, tmp_path / "tok", **QUIET)
    assert SentencePieceTokenizer(first).vocab_size == 300
    train_tokenizer(str(tmp_path / "a.txt"), 320, tmp_path / "tok", overwrite=True, **QUIET)
    assert SentencePieceTokenizer(first).vocab_size == 320
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "tok"]


@pytest.mark.parametrize(
    ("setup", "kwargs", "message"),
    [
        ({}, dict(inputs=["nothing/*.txt"]), r"--input .*nothing/\*.txt matched no files; check the path"),
        ({"e.txt": "\n\n"}, dict(inputs=["e.txt"]), "the inputs hold no text to train on"),
        ({"a.txt": "only latin"}, dict(inputs=["a.txt"], expert="cjk"), r"hold no CJK text \(Han, kana, Hangul\)"),
        ({"a.txt": ENGLISH}, dict(inputs=["a.txt"], vocab_size=100), "vocab_size=100 is too small: .* at least 260"),
        ({"a.txt": ENGLISH}, dict(inputs=["a.txt"], vocab_size=200, expert="cjk"), "at least 258"),
        (
            {"a.txt": ENGLISH},
            dict(inputs=["a.txt"], vocab_size=5000),
            r"vocab_size=5000 is more than this corpus supports \(at most \d+ pieces\); lower --vocab_size",
        ),
        (
            {"a.txt": "中文字符测试一二三四五六七八九十日本語カタカナ" * 3},
            dict(inputs=["a.txt"], vocab_size=270, expert="cjk"),
            r"vocab_size=270 cannot hold the corpus's characters and special pieces \(\d+ needed\); raise --vocab_size",
        ),
        ({"a.csv": "x"}, dict(inputs=["a.csv"]), r"unsupported input .*a.csv: expected .txt, .jsonl"),
        (
            {"a.jsonl": '{"body": "x"}\n'},
            dict(inputs=["a.jsonl"]),
            r"a.jsonl:1: missing text key; fix or remove it \(and check --text_key\)",
        ),
        ({"a.jsonl": "{oops\n"}, dict(inputs=["a.jsonl"]), "a.jsonl:1: unreadable JSON line; fix or remove it"),
        (
            {"a.jsonl": '{"text": "ok"}\n\n{oops\n'},
            dict(inputs=["a.jsonl"]),
            "a.jsonl:3: unreadable JSON line; fix or remove it",
        ),
        ({"a.txt": ENGLISH}, dict(inputs=["a.txt"], expert="thai"), "unknown expert 'thai'; choose one of: cjk"),
        ({"a.txt": ENGLISH}, dict(inputs=["a.txt"], model_prefix="x"), "model_prefix are set by train_tokenizer"),
        ({"a.txt": ENGLISH, "out": ""}, dict(inputs=["a.txt"]), "is a file; name a folder"),
        ({}, dict(inputs=iter([b"bytes"])), "yielded a bytes, not a string"),
    ],
)
def test_bad_training_input_is_one_line_with_the_fix(tmp_path, setup, kwargs, message):
    for name, text in setup.items():
        write(tmp_path / name, text)
    kwargs = {"vocab_size": 300, "output": tmp_path / "out", **kwargs}
    if isinstance(kwargs["inputs"], list):
        kwargs["inputs"] = [str(tmp_path / pattern) for pattern in kwargs["inputs"]]
    with pytest.raises(ValueError, match=message) as error:
        train_tokenizer(kwargs.pop("inputs"), kwargs.pop("vocab_size"), kwargs.pop("output"), **kwargs, **QUIET)
    assert "\n" not in str(error.value)


def test_train_tokenizer_cli(tmp_path, capsys):
    write(tmp_path / "en" / "a.txt", ENGLISH)
    records = [{"body": text} for text in ("中文文本，日本語テキスト。", "한국어 텍스트", "中文文本") * 10]
    write(tmp_path / "zh" / "b.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    argv = ["train-tokenizer", "--input", str(tmp_path / "en" / "*.txt"), "--input", str(tmp_path / "zh" / "*.jsonl")]
    args = parser.parse_args([*argv, "--vocab_size", "330", "--output", str(tmp_path / "tok"), "--text_key", "body"])
    args.run(args)
    info = json.loads((tmp_path / "tok" / "tokenizer_info.json").read_text())
    assert (info["vocab_size"], info["text_key"], info["sentences"], len(info["inputs"])) == (330, "body", 90, 2)
    assert capsys.readouterr().out.strip() == str(tmp_path / "tok" / "tokenizer.model")

    args = parser.parse_args([*argv, "--vocab_size", "330", "--output", str(tmp_path / "tok"), "--text_key", "body"])
    with pytest.raises(SystemExit, match="train-tokenizer: error: .* already exists; pass overwrite=True"):
        args.run(args)
    cjk = parser.parse_args([*argv, "--vocab_size", "280", "--output", str(tmp_path / "cjk"), "--expert", "cjk",
                             "--text_key", "body", "--overwrite"])  # fmt: skip
    cjk.run(cjk)
    assert json.loads((tmp_path / "cjk" / "tokenizer_info.json").read_text())["expert"] == "cjk"
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--vocab_size", "300", "--output", "x", "--expert", "thai"])
    assert "invalid choice: 'thai'" in capsys.readouterr().err


# ---------------------------------------------------------------- extend_vocabulary


@pytest.mark.parametrize("tied", [False, True])
def test_extend_vocabulary_keeps_base_logits_and_means_new_rows(tied):
    model = tiny_model(vocab_size=101, tie_embeddings=tied)
    old_embed = model.embed.weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
    extended = extend_vocabulary(model, 160)
    assert extended.config.vocab_size == 160 and extended.embed.num_embeddings == 160
    assert extended.lm_head.weight.shape == (160, model.config.dim)
    with torch.no_grad():
        after = extended(ids)
    assert after.shape == (2, 12, 160)
    torch.testing.assert_close(after[..., :101], before, atol=1e-6, rtol=0)
    assert torch.equal(extended.embed.weight[:101], old_embed)
    assert torch.equal(extended.lm_head.weight[:101], old_head)
    assert torch.allclose(extended.embed.weight[101:], old_embed.mean(0).expand(59, -1), atol=1e-7)
    assert torch.allclose(extended.lm_head.weight[101:], old_head.mean(0).expand(59, -1), atol=1e-7)
    assert (extended.lm_head.weight is extended.embed.weight) == tied
    assert extended.embed.weight.requires_grad and extended.lm_head.weight.requires_grad


def test_extend_vocabulary_refuses_to_shrink():
    with pytest.raises(ValueError, match="new_vocab_size=50 is smaller than the model's 101; extend_vocabulary only"):
        extend_vocabulary(tiny_model(vocab_size=101), 50)
    model = tiny_model(vocab_size=101)
    assert extend_vocabulary(model, 101) is model and model.config.vocab_size == 101


def test_base_checkpoint_extends_to_the_moe_vocabulary(moe, base):
    model = tiny_model(vocab_size=base.vocab_size)
    english = torch.tensor([base.encode(ENGLISH[:200])])
    with torch.no_grad():
        before = model(english)
    extend_vocabulary(model, moe.vocab_size)
    with torch.no_grad():
        after = model(torch.tensor([moe.encode(ENGLISH[:200])]))
        mixed = model(torch.tensor([moe.encode("Hello 世界, 안녕하세요")]))
    torch.testing.assert_close(after[..., : base.vocab_size], before, atol=1e-6, rtol=0)
    assert mixed.shape[-1] == moe.vocab_size == 44_000


def test_the_moxin_32k_tokenizer_loads_as_is(tmp_path):
    tokenizer = SentencePieceTokenizer(BASE_MODEL)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (32000, 1, 2, 0)
    assert tokenizer.encode("Hello 世界") == [22557, 28705, 30050, 29822]
    assert tokenizer.encode("Hello", bos=True, eos=True) == [1, 22557, 2]
    assert tokenizer.decode([22557, 28705, 30050, 29822]) == "Hello 世界"
    tokenizer.save(tmp_path)
    again = SentencePieceTokenizer(tmp_path)
    assert again.fingerprint == tokenizer.fingerprint and again.encode("Moxin 7B") == tokenizer.encode("Moxin 7B")
    with pytest.raises(FileNotFoundError, match="tokenizer .*nothing.model not found"):
        SentencePieceTokenizer(tmp_path / "nothing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model is not a SentencePiece model"):
        SentencePieceTokenizer(tmp_path / "junk.model")


@pytest.mark.parametrize("kind", ["sentencepiece", "moe"])
def test_the_tokenizer_is_chosen_in_yaml_by_class_path(kind, cjk_expert, tmp_path):
    from jsonargparse import ArgumentParser

    from moxin_lightning.tokenizers import Tokenizer

    if kind == "sentencepiece":
        component = (
            f"class_path: moxin_lightning.tokenizers.SentencePieceTokenizer\n  init_args:\n    path: {BASE_MODEL}"
        )
    else:
        component = (
            "class_path: moxin_lightning.tokenizers.MoETokenizer\n  init_args:\n"
            f"    base: {BASE_MODEL}\n    experts:\n      cjk: {cjk_expert}"
        )
    config = tmp_path / "tokenizer.yaml"
    config.write_text(f"tokenizer:\n  {component}\n")
    parser = ArgumentParser()
    parser.add_argument("--config", action="config")
    parser.add_argument("--tokenizer", type=Tokenizer)
    tokenizer = parser.instantiate_classes(parser.parse_args(["--config", str(config)])).tokenizer
    assert tokenizer.encode("Hello 世界")[:1] == [22557]
    assert tokenizer.vocab_size == (
        32000 if kind == "sentencepiece" else 32000 + SentencePieceTokenizer(cjk_expert).vocab_size
    )
