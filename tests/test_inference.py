"""Opening checkpoints for inference (`checkpoint.load_model`), the `export` command, and the `generate` command's
decoding session, text stream and chat loop: equalities with a fresh computation, with transformers, and the
one-line errors for bad paths and mismatched tokenizers."""

from __future__ import annotations

import argparse
import io
import json

import lightning as L
import pytest
import sentencepiece as spm
import torch

from moxin_lightning.checkpoint import load_model, tokenizer_state
from moxin_lightning.cli import main
from moxin_lightning.export import export_checkpoint, parse_size
from moxin_lightning.generate import generate
from moxin_lightning.hf import CheckpointError, export_hf
from moxin_lightning.model.transformer import same_weights
from moxin_lightning.session import DecodeSession, TextStream
from moxin_lightning.tasks import Pretrain
from moxin_lightning.terminal import chat, complete
from moxin_lightning.tokenizers import SentencePieceTokenizer
from moxin_lightning.tokenizers.chat import TULU
from tests.test_task import Loader

TINY = dict(
    vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, max_seq_len=256,
    sliding_window=16,
)  # fmt: skip
TEXT = ["The quick brown fox jumps over the lazy dog.", "Moxin is a fully open language model. 世界 héllo"] * 50


def train_sentencepiece(
    folder, vocab_size: int = 300, seed_text: str = "", texts=TEXT, byte_fallback: bool = True
) -> SentencePieceTokenizer:
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t + seed_text for t in texts] + ["<|user|>\n<|assistant|>\n"] * 10),
        model_writer=buffer, vocab_size=vocab_size, model_type="bpe", byte_fallback=byte_fallback,
        hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())
    return SentencePieceTokenizer(folder / "tokenizer.model")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    trained = train_sentencepiece(tmp_path_factory.mktemp("tok"))
    assert trained.vocab_size == TINY["vocab_size"]  # the model's vocabulary is exactly the tokenizer's
    return trained


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    return train_sentencepiece(tmp_path_factory.mktemp("tok2"), seed_text=" extra words here")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOXIN_CACHE", str(tmp_path / "cache"))


def tiny_task(seed: int = 3) -> Pretrain:
    module = Pretrain(preset="moxin-tiny-9m", model_overrides=TINY, lr=1e-3, warmup_steps=1, seed=seed)
    module.configure_model()
    return module


class TokenizerData(L.LightningDataModule):
    """Random rows, and the tokenizer attribute every datamodule of ours exposes."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 300, (4, 2, 24), generator=generator)
        rows = [{"input_ids": row, "labels": torch.roll(row, -1, 1), "doc_ids": torch.zeros_like(row)} for row in ids]
        return Loader(rows)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """A .ckpt written by a real Trainer run (2 steps) with a datamodule that has a tokenizer."""
    folder = tmp_path_factory.mktemp("run")
    module = tiny_task()
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=folder,
    )  # fmt: skip
    trainer.fit(module, datamodule=TokenizerData(tokenizer))
    trainer.save_checkpoint(folder / "last.ckpt")
    return module, folder / "last.ckpt"


# -- load_model ---------------------------------------------------------------------------------------------


def test_a_training_checkpoint_carries_its_config_and_tokenizer(trained, tokenizer):
    module, ckpt = trained
    loaded = load_model(ckpt)
    assert same_weights(module.model, loaded.model)
    assert loaded.config == module.model_config
    assert loaded.tokenizer.fingerprint == tokenizer.fingerprint
    assert loaded.tokenizer.encode("lazy dog") == tokenizer.encode("lazy dog")
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    saved = torch.load(ckpt, weights_only=True)
    assert saved["tokenizer"]["files"]["tokenizer.model"].dtype == torch.uint8


def test_a_sharded_checkpoint_folder_loads_the_same_model(tmp_path, trained, tokenizer):
    import torch.distributed.checkpoint as dcp

    module, _ = trained
    # laid out as Lightning's FSDP2 save does: tensors through torch.distributed.checkpoint, the rest in meta.pt
    state = {"state_dict": {f"model.{name}": tensor.clone() for name, tensor in module.model.state_dict().items()}}
    with pytest.warns(UserWarning):  # "no process group: saving in a single process"
        dcp.save(state, checkpoint_id=str(tmp_path / "sharded"))
    meta = {"model_config": module.model_config.to_dict(), "tokenizer": tokenizer_state(tokenizer), "global_step": 2}
    torch.save(meta, tmp_path / "sharded" / "meta.pt")
    loaded = load_model(tmp_path / "sharded")
    assert same_weights(module.model, loaded.model)
    assert loaded.tokenizer.fingerprint == tokenizer.fingerprint


def test_a_hugging_face_folder_uses_its_own_tokenizer_and_a_given_one_must_match(tmp_path, trained, tokenizer):
    module, _ = trained
    export_hf(module.model, tmp_path / "hf", tokenizer)
    loaded = load_model(tmp_path / "hf", tokenizer=tokenizer.path, dtype=torch.bfloat16)
    assert loaded.tokenizer.fingerprint == tokenizer.fingerprint
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_a_folder_without_tokenizer_takes_one_by_flag(tmp_path, trained, tokenizer):
    module, _ = trained
    export_hf(module.model, tmp_path / "bare")
    with pytest.raises(CheckpointError, match="holds no tokenizer; pass --tokenizer"):
        load_model(tmp_path / "bare")
    assert load_model(tmp_path / "bare", tokenizer=tokenizer.path).tokenizer.fingerprint == tokenizer.fingerprint


def test_mismatched_tokenizers_and_bad_paths_are_one_line_errors(tmp_path, trained, tokenizer, other_tokenizer):
    module, ckpt = trained
    cases = [
        (lambda: load_model(tmp_path / "nowhere"), "does not exist; pass a release or Hugging Face folder"),
        (lambda: load_model(ckpt, tokenizer=other_tokenizer.path), "is not the one"),
        (lambda: load_model(ckpt, tokenizer=tmp_path / "nope.model"), "tokenizer .*nope.model does not exist"),
        (lambda: load_model(tmp_path), "is neither a Hugging Face/release folder"),
    ]
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    cases.append((lambda: load_model(tmp_path / "junk.ckpt"), "cannot read .*junk.ckpt as a tensor-only checkpoint"))
    big = train_sentencepiece(tmp_path / "big", vocab_size=400)
    export_hf(module.model, tmp_path / "bare")
    cases.append((lambda: load_model(tmp_path / "bare", tokenizer=big.path), "has 400 pieces but .* vocabulary of 300"))
    for call, message in cases:
        with pytest.raises(CheckpointError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    for command in (["generate", "--prompt", "x"], ["export", "--out", str(tmp_path / "o")]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--checkpoint", str(tmp_path / "missing")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: checkpoint ") and "does not exist" in err and "\n" not in err
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", str(tmp_path)])
    assert capsys.readouterr().err.strip() == "error: give either --prompt TEXT or --chat"


# -- export ---------------------------------------------------------------------------------------------------


def test_export_of_a_training_checkpoint_loads_in_transformers_with_equal_logits(tmp_path, trained, tokenizer):
    from transformers import AutoModelForCausalLM

    module, ckpt = trained
    main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"), "--max_shard_size", "100KB"])
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert "tokenizer.model" in files and "model.safetensors.index.json" in files
    assert sum(name.endswith(".safetensors") for name in files) > 1  # sharded at 100 KB
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog.", bos=True)])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, module.model.eval()(ids), atol=1e-5)
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == tokenizer.path.read_bytes()


def test_export_refuses_an_existing_destination_before_loading_and_converts_dtype(tmp_path, trained):
    _, ckpt = trained
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists; choose another --out or pass --overwrite"):
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path / "taken")  # refused before the checkpoint is read
    with pytest.raises(FileExistsError, match="is not a Hugging Face folder; --overwrite replaces only one"):
        export_checkpoint(ckpt, tmp_path / "taken", overwrite=True)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    folder = export_checkpoint(ckpt, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(load_model(folder).model.parameters()).dtype == torch.bfloat16
    export_checkpoint(ckpt, folder, overwrite=True)  # an HF folder may be replaced
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("1.5kb", 1500), ("1024", 1024)])
def test_shard_sizes_parse_like_hugging_face(text, size):
    assert parse_size(text) == size


def test_a_bad_shard_size_is_a_one_line_error():
    with pytest.raises(ValueError, match="--max_shard_size '5 parsecs' is not a size; write e.g. 5GB"):
        parse_size("5 parsecs")


# -- the decoding session and the text stream -------------------------------------------------------------------


def test_streamed_greedy_tokens_equal_generate_past_the_window(trained):
    module, _ = trained
    model = module.model.eval()
    prompt = list(range(3, 23))  # 20 tokens, the window is 16
    session = DecodeSession(model, prefill_chunk=7)
    session.feed(prompt)
    streamed = list(session.stream(40))
    assert streamed == generate(model, [prompt], 40)[0]
    assert session.history == prompt + streamed[:-1]  # the last token is run through the model only when needed


def test_a_padded_vocabulary_samples_only_the_tokenizer_s_ids(trained):
    module, _ = trained
    session = DecodeSession(module.model.eval(), vocab_limit=40)
    session.feed([1, 5, 9])
    drawn = list(session.stream(60, temperature=1.5, generator=torch.Generator().manual_seed(0)))
    assert len(drawn) == 60 and max(drawn) < 40
    unlimited = DecodeSession(module.model)
    unlimited.feed([1, 5, 9])
    assert max(unlimited.stream(60, temperature=1.5, generator=torch.Generator().manual_seed(0))) >= 40


def test_continuing_a_session_equals_a_fresh_prefill_of_the_whole_sequence(trained):
    module, _ = trained
    model = module.model.eval()
    first = list(range(3, 30))
    session = DecodeSession(model)
    session.feed(first)
    reply = list(session.stream(12))
    follow_up = [*first, *reply, 7, 8, 9, 10]
    session.continue_with(follow_up)
    assert session.history == follow_up  # the cached prefix was kept, only the new tokens were fed
    fresh = DecodeSession(model)
    fresh.feed(follow_up)
    assert torch.allclose(session._logits, fresh._logits, atol=1e-5)
    session.continue_with([1, 5, 6])  # diverges from the cache: starts over
    assert session.history == [1, 5, 6]
    with pytest.raises(ValueError, match="would reach 300 tokens, beyond max_seq_len=256"):
        session.feed([4] * 297)


def test_text_stream_pieces_add_up_to_the_decoded_text(tokenizer):
    text = " jumps over 世界 héllo, the lazy dog."
    prompt = tokenizer.encode("The quick brown fox", bos=True)
    ids = tokenizer.encode("The quick brown fox" + text, bos=True)[len(prompt) :]
    assert any(tokenizer.processor.is_byte(i) for i in ids)  # the CJK characters are spelled in bytes
    stream = TextStream(tokenizer, prompt)
    pieces = [stream.add(token) for token in ids + [tokenizer.eos_id]]
    assert "".join(pieces) == tokenizer.decode(prompt + ids)[len(tokenizer.decode(prompt)) :]
    assert "\ufffd" not in "".join(pieces)


def settings(**overrides) -> argparse.Namespace:
    values = dict(max_new_tokens=12, temperature=0.0, top_p=1.0, top_k=0, system=None)
    return argparse.Namespace(**{**values, **overrides})


def test_prompt_mode_streams_the_greedy_continuation(trained, tokenizer, capsys):
    module, ckpt = trained
    main(
        ["generate", "--checkpoint", str(ckpt), "--prompt", "The quick", "--temperature", "0", "--max_new_tokens", "9"]
    )
    prompt = tokenizer.encode("The quick", bos=True)
    expected = generate(module.model.eval(), [prompt], 9, eos_id=tokenizer.eos_id)[0]
    reply = [t for t in expected if t != tokenizer.eos_id]
    out = capsys.readouterr()
    assert out.out == tokenizer.decode(prompt + reply)[len(tokenizer.decode(prompt)) :] + "\n"
    assert f"[{len(expected)} tokens in" in out.err


def test_chat_turns_equal_greedy_generation_over_the_re_encoded_conversation(trained):
    _, ckpt = trained
    loaded = load_model(ckpt)
    tokenizer, eos = loaded.tokenizer, loaded.tokenizer.eos_id
    lines = iter(["hello there", "", "and the fox?", "/exit", "never read"])
    out = io.StringIO()
    messages = chat(
        loaded, TULU, DecodeSession(loaded.model), settings(system="Be brief."), lambda: next(lines), out, None
    )
    assert next(lines) == "never read"  # /exit stopped the loop
    turns, printed = [{"role": "system", "content": "Be brief."}], []
    for question in ("hello there", "and the fox?"):
        turns.append({"role": "user", "content": question})
        ids, _ = TULU.encode(tokenizer, turns, add_generation_prompt=True)
        reply = generate(loaded.model, [ids], 12, eos_id=eos)[0]
        printed.append(_expected_text(tokenizer, ids, reply))
        turns.append({"role": "assistant", "content": tokenizer.decode([t for t in reply if t != eos])})
    assert messages == turns
    assert out.getvalue() == "\n".join(printed) + "\n"


def test_chat_reset_forgets_the_conversation(trained):
    _, ckpt = trained
    loaded = load_model(ckpt)
    lines = iter(["hi", "/reset", "hi"])
    out = io.StringIO()
    messages = chat(loaded, TULU, DecodeSession(loaded.model), settings(), lambda: next(lines, None), out, None)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    first, notice, second, _ = out.getvalue().split("\n")
    assert notice == "(conversation reset)" and first == second


def _expected_text(tokenizer, context, reply) -> str:
    stream = TextStream(tokenizer, context)
    return "".join(stream.add(t) for t in reply)


def test_complete_resets_the_session_between_prompts(trained):
    module, ckpt = trained
    loaded = load_model(ckpt)
    session = DecodeSession(loaded.model)
    first = complete(loaded, "The lazy", session, settings(), io.StringIO(), None)
    again = complete(loaded, "The lazy", session, settings(), io.StringIO(), None)
    assert first == again == generate(loaded.model, [loaded.tokenizer.encode("The lazy", bos=True)], 12, eos_id=2)[0]


def test_a_checkpoint_that_does_not_fit_its_model_is_named_tensor_by_tensor(tmp_path, trained):
    """`check_state`, shared by `load_model` and `init_from`: the first missing, misshapen or extra tensor."""
    from moxin_lightning.model.config import ModelConfig
    from moxin_lightning.tasks.init_from import read_initial_state

    module, ckpt = trained
    saved = torch.load(ckpt, weights_only=True)
    del saved["state_dict"]["model.norm.weight"]
    torch.save(saved, tmp_path / "partial.ckpt")
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path / "partial.ckpt")
    assert str(error.value) == (
        f"{tmp_path / 'partial.ckpt'} lacks 'norm.weight'; the checkpoint does not match its own model_config"
    )
    smaller = ModelConfig(**{**saved["model_config"], "n_layers": 1})
    with pytest.raises(CheckpointError) as error:
        read_initial_state(ckpt, smaller)
    assert str(error.value) == (
        f"{ckpt} has unexpected tensor 'blocks.1.attn.k_proj.weight'; set the task's preset/model overrides to "
        "match the checkpoint"
    )
    wider = ModelConfig(**{**saved["model_config"], "ffn_dim": 96})
    with pytest.raises(
        CheckpointError, match=r"'blocks.0.mlp.gate_proj.weight' has shape \(128, 64\), the model needs \(96, 64\); set"
    ):
        read_initial_state(ckpt, wider)
