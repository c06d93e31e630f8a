"""CheckpointPromotion and moxin_lightning.release: a real (tiny, CPU) Lightning run ends in a release folder.

One module-scoped run (4 steps, validation every 2, best-validation releases on) serves the tests that read
its folder; the runs that must crash, stop early or resume have their own few-step trainers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

import moxin_lightning
from moxin_lightning import release as release_module
from moxin_lightning.callbacks.promotion import CheckpointPromotion
from moxin_lightning.hf import import_hf
from moxin_lightning.model import ModelConfig, Transformer
from moxin_lightning.release import (
    MOF_COMPONENTS,
    LossCurves,
    Release,
    format_value,
    missing_for_class,
    model_from_state_dict,
    mof_class,
    mof_manifest,
    write_release,
)
from moxin_lightning.tokenizers import SentencePieceTokenizer, train_tokenizer

from .conftest import same_weights

CONFIG = ModelConfig.from_name(
    "moxin-tiny-9m", vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
    max_seq_len=256, sliding_window=64,
)  # fmt: skip
SEQ_LEN, BATCH = 32, 4
FOLDERS = ["/data/prepared/web", "/cache/data/builtin:local-0123abcd"]
DATA_NAMES = ["0-web", "1-builtin_local-0123abcd"]  # the folders under data/ in the release
PROMPTS = ["the model reads", "tokens"]


# ----------------------------------------------------------------------------------------------
# stand-ins for the task and the datamodule


class TinyTask(L.LightningModule):
    """The interface CheckpointPromotion uses (model_config, full_state_dict, logged losses), on random tokens.

    It keeps what it logged, so the tests can compare the callback's curves with the logged values."""

    def __init__(self, lr: float = 3e-3, fail_at_step: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.model = Transformer(CONFIG)
        self.logged_train: list[tuple[int, float]] = []
        self.val_batch_losses: list[float] = []
        self.logged_val: list[tuple[int, float]] = []

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().float().cpu().clone() for name, tensor in self.model.state_dict().items()}

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.model(batch["input_ids"])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())

    def training_step(self, batch, batch_idx):
        if self.hparams.fail_at_step == self.global_step:
            raise RuntimeError("simulated crash in training_step")
        loss = self._loss(batch)
        self.log("train/loss", loss)
        self.log("train/tokens_seen", float((self.global_step + 1) * BATCH * SEQ_LEN))
        self.logged_train.append((self.global_step + 1, loss.item()))
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val/loss", loss)
        self.log("val/ppl", loss.exp())
        if not self.trainer.sanity_checking:
            self.val_batch_losses.append(loss.item())

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.logged_val.append((self.global_step, sum(self.val_batch_losses) / len(self.val_batch_losses)))
            self.val_batch_losses = []

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def manifest(name: str, tokenizer: SentencePieceTokenizer) -> dict:
    """A manifest shaped like `prepare`'s, small and fixed."""
    return {
        "format": "moxin_lightning.tokens/1",
        "fingerprint": hashlib.sha256(name.encode()).hexdigest(),
        "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size},
        "split": {"val_fraction": 0.1, "seed": 0},
        "splits": {
            "train": {"documents": 90, "tokens": 9000, "sha256": "a" * 64},
            "val": {"documents": 10, "tokens": 1000, "sha256": "b" * 64},
        },
        "documents": 100,
        "tokens": 10000,
        "sources": [{"input": f"{name}.jsonl", "documents": 100, "bytes": 40000, "sha256": "c" * 64}],
    }


class TinyData(L.LightningDataModule):
    """Random-token batches {input_ids, labels}, with the attributes PretrainData offers the callback."""

    def __init__(self, tokenizer=None) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.datasets = list(FOLDERS)
        self.manifests = [manifest(Path(f).name, tokenizer) for f in FOLDERS] if tokenizer else []
        self.seq_len, self.batch_size = SEQ_LEN, BATCH

    @staticmethod
    def _batches(seed: int, count: int) -> list[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        batches = []
        for _ in range(count):
            ids = torch.randint(3, 300, (BATCH, SEQ_LEN + 1), generator=generator)
            batches.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
        return batches

    def train_dataloader(self):
        return DataLoader(self._batches(0, 16), batch_size=None)

    def val_dataloader(self):
        return DataLoader(self._batches(1, 2), batch_size=None)


def make_trainer(callbacks: list[Callback], max_steps: int = 4, **overrides) -> L.Trainer:
    settings = dict(
        accelerator="cpu", devices=1, max_steps=max_steps, val_check_interval=2, limit_val_batches=2,
        num_sanity_val_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    return L.Trainer(**{**settings, **overrides})


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    words = "the model reads tokens and learns to predict the next one from the ones before it".split()
    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=generator)) for _ in range(200)]
    folder = train_tokenizer(iter(texts), 300, tmp_path_factory.mktemp("tokenizer"), progress=False, minloglevel=2)
    return SentencePieceTokenizer(folder)


@pytest.fixture(scope="module")
def phase(tmp_path_factory, tokenizer) -> SimpleNamespace:
    """One 4-step phase with a release at the end and best-validation releases."""
    root = tmp_path_factory.mktemp("phase")
    dirpath = root / "releases" / "phase1"
    callback = CheckpointPromotion(
        dirpath=str(dirpath), on_best_val=True, sample_prompts=PROMPTS, sample_tokens=5, description="A test model."
    )
    task, data = TinyTask(), TinyData(tokenizer)
    trainer = make_trainer([callback])
    trainer.fit(task, datamodule=data)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    return SimpleNamespace(
        root=root, path=dirpath, best=root / "releases" / "phase1-best", task=task, data=data, trainer=trainer,
        callback=callback, metrics=metrics,
    )  # fmt: skip


def read_json(path: Path):
    return json.loads(path.read_text())


def folder_digest(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ----------------------------------------------------------------------------------------------
# the release of a finished phase


def test_release_folder_holds_every_part(phase, tokenizer):
    names = {p.name for p in phase.path.iterdir()}
    assert names == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
        "config.yaml", "data", "metrics.json", "loss_curves.json", "loss.png", "samples.json", "code",
        "version.json", "mof.json", "README.md",
    }  # fmt: skip
    assert (phase.path / "tokenizer.model").read_bytes() == tokenizer.path.read_bytes()
    assert yaml.safe_load((phase.path / "config.yaml").read_text()) == {"model": {"lr": 3e-3, "fail_at_step": None}}
    assert sorted(p.name for p in (phase.path / "data").iterdir()) == [*DATA_NAMES, "README.md"]
    for index, name in enumerate(DATA_NAMES):
        assert read_json(phase.path / "data" / name / "manifest.json") == phase.data.manifests[index]
    assert "| train | 90 | 9000 |" in (phase.path / "data" / "README.md").read_text()
    assert (phase.path / "code" / "callbacks" / "promotion.py").read_text() == Path(sys.modules[
        CheckpointPromotion.__module__].__file__).read_text()  # fmt: skip
    assert not list(phase.path.parent.glob(".phase1*")), "no staging or old folders left beside the release"


def test_version_names_the_package_and_the_commit(phase):
    version = read_json(phase.path / "version.json")
    assert version["moxin_lightning"] == moxin_lightning.__version__
    assert (version["torch"], version["lightning"]) == (torch.__version__, L.__version__)
    root = Path(moxin_lightning.__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0 or not (root / ".git").exists():
        assert version["git"] is None
    else:
        assert version["git"]["commit"] == head.stdout.strip() and isinstance(version["git"]["dirty"], bool)


def test_release_weights_are_the_trained_weights(phase):
    ours = import_hf(phase.path)
    assert ours.config == CONFIG and same_weights(ours, phase.task.model)
    transformers = pytest.importorskip("transformers")
    reference = transformers.MistralForCausalLM.from_pretrained(phase.path).eval()
    ids = torch.randint(0, CONFIG.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, phase.task.model.eval()(ids), atol=1e-4, rtol=0)


def test_metrics_are_the_trainers_final_metrics(phase):
    written = read_json(phase.path / "metrics.json")
    assert written["metrics"] == phase.metrics
    assert set(phase.metrics) == {"train/loss", "train/tokens_seen", "val/loss", "val/ppl"}
    assert written["training"] == {
        "global_step": 4, "max_steps": 4, "tokens_seen": 4 * BATCH * SEQ_LEN, "seq_len": SEQ_LEN,
        "batch_size": BATCH, "accumulate_grad_batches": 1, "devices": 1, "precision": "32-true",
    }  # fmt: skip


def untrained_val_loss() -> float:
    """The validation loss of TinyTask's starting weights (seeded), on both validation batches: the step-0 point."""
    task = TinyTask()
    with torch.no_grad():
        losses = [task._loss(batch).item() for batch in TinyData._batches(1, 2)]
    return sum(losses) / len(losses)


def test_loss_curves_are_the_logged_losses_and_are_plotted(phase):
    curves = LossCurves.from_dict(read_json(phase.path / "loss_curves.json"))
    assert curves.train == phase.task.logged_train and [s for s, _ in curves.train] == [1, 2, 3, 4]
    # step 0: the sanity check (1 batch in make_trainer) widened to the whole validation set, before any update
    assert [s for s, _ in curves.val] == [0, 2, 4]
    assert curves.val[0][1] == pytest.approx(untrained_val_loss(), rel=1e-6)
    assert [v for _, v in curves.val[1:]] == pytest.approx([v for _, v in phase.task.logged_val], rel=1e-6)
    assert phase.trainer.num_sanity_val_steps == 1  # the trainer's setting is given back after the check
    assert curves == phase.callback.curves
    png = (phase.path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (7 * 120, 4 * 120)


def test_model_card_has_architecture_metrics_plot_and_how_to_load(phase):
    card = (phase.path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "# phase1\n\nA test model." in card
    for row in ("| dim | 64 |", "| n_kv_heads | 2 |", f"| parameters | {CONFIG.num_params()} |", "| global_step | 4 |"):
        assert row in card
    for name, value in phase.metrics.items():
        assert f"| {name} | {format_value(value)} |" in card
    assert f"| val/loss | {phase.metrics['val/loss']:.6g} |" in card
    assert "![loss](loss.png)" in card
    curves = phase.callback.curves
    last_ema = release_module.ema([v for _, v in curves.train], 0.9)[-1]
    assert f"| train/loss | 4 | {format_value(curves.train[-1][1])} | {format_value(last_ema)} |" in card
    assert f"| val/loss | 4 | {format_value(phase.metrics['val/loss'])} |  |" in card
    assert f"init_from: {phase.path}" in card and f'from_pretrained("{phase.path}")' in card
    assert (
        "Class reached by this folder alone: **none (below Class III)**. Missing for Class III - Open Model: "
        "Technical report or Research paper." in card
    )
    assert "| Datasets | no | referenced by the manifests in data/" in card


def test_mof_manifest_says_what_the_release_holds(phase):
    mof = read_json(phase.path / "mof.json")
    assert [c["id"] for c in mof["components"]] == list(MOF_COMPONENTS) and len(MOF_COMPONENTS) == 17
    included = {c["id"]: c["path"] for c in mof["components"] if c["included"]}
    assert included == {
        "model_architecture": "code/moxin_lightning/model", "data_preprocessing_code": "code/moxin_lightning/data",
        "training_code": "code/", "inference_code": "code/moxin_lightning/decoding.py",
        "supporting_libraries_and_tools": "code/", "final_parameters": "model.safetensors",
        "model_metadata": "config.json", "sample_outputs": "samples.json", "model_card": "README.md",
        "data_card": "data/README.md", "evaluation_results": "metrics.json",
    }  # fmt: skip
    assert all((phase.path / path).exists() for path in included.values())
    datasets = next(c for c in mof["components"] if c["id"] == "datasets")
    assert datasets["included"] is False and "referenced by the manifests in data/" in datasets["note"]
    assert mof["class"] is None and mof["next_class"] == {
        "class": 3, "name": "Class III - Open Model", "missing": ["technical_report or research_paper"],
    }  # fmt: skip


def test_mof_class_follows_the_class_definitions():
    everything = set(MOF_COMPONENTS)
    assert mof_class(everything) == 1
    assert mof_class(everything - {"model_metadata", "sample_outputs"}) == 1  # optional in every class
    assert mof_class(everything - {"research_paper"}) == 2  # the technical report still serves Class III
    assert mof_class(everything - {"intermediate_parameters", "datasets"}) == 2
    assert missing_for_class(everything - {"datasets", "evaluation_code"}, 1) == ["evaluation_code", "datasets"]
    open_model = {"model_architecture", "final_parameters", "research_paper", "evaluation_results", "model_card"}
    assert mof_class(open_model | {"data_card"}) == 3 and mof_class(open_model) is None
    assert missing_for_class(open_model - {"research_paper"}, 3) == ["technical_report or research_paper", "data_card"]
    with pytest.raises(ValueError, match="unknown MOF component 'weights'; use one of: model_architecture"):
        mof_manifest({"weights": ("model.safetensors", "")})


def test_sample_outputs_are_the_models_greedy_continuations(phase, tokenizer):
    from moxin_lightning.generate import generate

    samples = read_json(phase.path / "samples.json")["samples"]
    prompts = [tokenizer.encode(p, bos=True) for p in PROMPTS]
    expected = generate(phase.task.model.eval(), prompts, 5, eos_id=tokenizer.eos_id)
    assert [s["tokens"] for s in samples] == expected and [s["prompt"] for s in samples] == PROMPTS
    for sample in samples:
        known = [t for t in sample["tokens"] if t < tokenizer.vocab_size and t != tokenizer.eos_id]
        assert sample["completion"] == tokenizer.decode(known)


def test_sample_ids_beyond_the_tokenizer_are_kept_but_not_decoded(tokenizer):
    """The model's vocabulary (320) is padded past the tokenizer's (300): a padding id must not break decoding."""
    model = Transformer(CONFIG)
    with torch.no_grad():  # blocks add nothing, every hidden state is all ones, and only id 310 scores above 0
        for name, param in model.named_parameters():
            param.fill_(1.0 if name in ("embed.weight", "norm.weight") else 0.0)
        model.lm_head.weight[310] = 1.0
    samples = release_module.sample_outputs(
        model, Release(tokenizer=tokenizer, sample_prompts=["the"], sample_tokens=3)
    )
    assert samples == [{"prompt": "the", "completion": "", "tokens": [310, 310, 310]}]


def test_best_validation_release_holds_the_lowest_validation_loss(phase):
    trained = [(step, loss) for step, loss in phase.callback.curves.val if step > 0]  # step 0 is never released
    best_step, best_loss = min(trained, key=lambda point: point[1])
    written = read_json(phase.best / "metrics.json")
    assert written["metrics"]["val/loss"] == best_loss == phase.callback.best
    assert written["training"]["global_step"] == best_step
    assert read_json(phase.best / "loss_curves.json")["val"][-1] == [best_step, best_loss]
    assert import_hf(phase.best).config == CONFIG


def test_bfloat16_release_of_a_tied_model_leaves_the_callers_model_alone(tmp_path):
    torch.manual_seed(1)
    model = Transformer(CONFIG.replace(tie_embeddings=True))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    rebuilt = model_from_state_dict(model.config, model.state_dict())
    assert rebuilt.lm_head.weight is rebuilt.embed.weight and same_weights(rebuilt, model)
    write_release(tmp_path / "r", model, Release(include_code=False), dtype="bfloat16")
    assert read_json(tmp_path / "r" / "config.json")["torch_dtype"] == "bfloat16"
    loaded = import_hf(tmp_path / "r")
    assert all(torch.equal(loaded.state_dict()[n], t.to(torch.bfloat16)) for n, t in before.items())
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())  # still float32, unchanged
    assert not (tmp_path / "r" / "loss.png").exists()  # no curves recorded: no plot, and the card says nothing
    assert "## Training curves" not in (tmp_path / "r" / "README.md").read_text()


# ----------------------------------------------------------------------------------------------
# nothing half-written, nothing written for an unfinished phase


def test_failed_write_keeps_the_previous_release(phase, tmp_path, monkeypatch):
    previous = tmp_path / "release"
    shutil.copytree(phase.path, previous)
    before = folder_digest(previous)
    model = model_from_state_dict(CONFIG, phase.task.full_state_dict())
    contents = Release(name="again", metrics={"val/loss": 1.0}, curves=LossCurves(train=[(1, 2.0)]))

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(release_module.write, "plot_curves", disk_full)  # where write_release looks it up
    with pytest.raises(OSError, match="No space left on device"):
        write_release(previous, model, contents, overwrite=True)
    assert folder_digest(previous) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]

    monkeypatch.undo()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".release.tmp-{int(dead.stdout)}-deadbeef"  # what a killed writer leaves
    stale.mkdir()
    write_release(previous, model, dataclasses.replace(contents, include_code=False), overwrite=True)
    assert read_json(previous / "metrics.json")["metrics"] == {"val/loss": 1.0}
    assert not (previous / "code").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def test_crashed_training_writes_no_release(tmp_path, tokenizer):
    callback = CheckpointPromotion(dirpath=str(tmp_path / "phase1"))
    task = TinyTask(fail_at_step=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer([callback]).fit(task, datamodule=TinyData(tokenizer))
    assert len(task.logged_train) == 3 and list(tmp_path.iterdir()) == []


class StopAt(Callback):
    """Stops fit early, as a wall-time limit does before a job is resumed."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_phase_stopped_before_max_steps_writes_no_release(tmp_path, tokenizer):
    callback = CheckpointPromotion(dirpath=str(tmp_path / "phase1"))
    with pytest.warns(UserWarning, match="training stopped at step 2 before max_steps=4; no release written"):
        make_trainer([callback, StopAt(2)]).fit(TinyTask(), datamodule=TinyData(tokenizer))
    assert list(tmp_path.iterdir()) == []


def test_resumed_run_keeps_the_curve_of_the_first_part(tmp_path, tokenizer):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)  # saved after each validation
    first = TinyTask()
    callbacks = [CheckpointPromotion(dirpath=str(tmp_path / "phase1")), checkpoints, StopAt(2)]
    with pytest.warns(UserWarning, match="no release written"):
        make_trainer(callbacks, enable_checkpointing=True).fit(first, datamodule=TinyData(tokenizer))
    ckpt = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    saved = torch.load(ckpt, weights_only=True)["callbacks"]
    state = saved[CheckpointPromotion(dirpath=str(tmp_path / "phase1")).state_key]
    assert state["curves"]["train"] == [[s, v] for s, v in first.logged_train]
    assert [s for s, _ in state["curves"]["val"]] == [0, 2]

    second, callback = TinyTask(), CheckpointPromotion(dirpath=str(tmp_path / "phase1"), include_code=False)
    resumed = make_trainer([callback, ModelCheckpoint(dirpath=tmp_path / "ckpt")], enable_checkpointing=True)
    resumed.fit(second, datamodule=TinyData(tokenizer), ckpt_path=ckpt)
    curves = read_json(tmp_path / "phase1" / "loss_curves.json")
    assert curves["train"] == [[s, v] for s, v in first.logged_train + second.logged_train]
    assert [s for s, _ in curves["train"]] == [1, 2, 3, 4] and [s for s, _ in curves["val"]] == [0, 2, 4]
    assert same_weights(import_hf(tmp_path / "phase1"), second.model)

    copy = CheckpointPromotion(dirpath="elsewhere")
    copy.load_state_dict(callback.state_dict())
    assert (copy.curves, copy.best) == (callback.curves, callback.best)


# ----------------------------------------------------------------------------------------------
# refused before any training


def test_bad_settings_are_refused_before_training(tmp_path, tokenizer, phase):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    cases = [
        (CheckpointPromotion(dirpath=str(tmp_path / "notes")), TinyData(tokenizer), "exists and is not a release"),
        (
            CheckpointPromotion(dirpath=str(phase.path), overwrite=False),
            TinyData(tokenizer),
            "already holds a release; pass overwrite=True",
        ),
        (
            CheckpointPromotion(dirpath=str(tmp_path / "r"), sample_prompts=["hi"]),
            TinyData(None),
            "sample_prompts need the datamodule's tokenizer",
        ),
    ]
    for callback, data, message in cases:
        task = TinyTask()
        with pytest.raises(ValueError, match=message):
            make_trainer([callback]).fit(task, datamodule=data)
        assert task.logged_train == []
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"

    class NoStateDict(TinyTask):
        full_state_dict = None

    with pytest.raises(ValueError, match="NoStateDict has no `full_state_dict`"):
        make_trainer([CheckpointPromotion(dirpath=str(tmp_path / "r"))]).fit(NoStateDict(), datamodule=TinyData())
    with pytest.raises(ValueError, match="dtype='fp8' is not one of float32, bfloat16, float16"):
        CheckpointPromotion(dirpath="r", dtype="fp8")
    with pytest.raises(ValueError, match="best_dirpath r is dirpath itself"):
        CheckpointPromotion(dirpath="r", best_dirpath="r")
    state = phase.task.full_state_dict()
    del state["norm.weight"]
    with pytest.raises(ValueError, match="the state dict lacks 'norm.weight' for a 2-layer model"):
        model_from_state_dict(CONFIG, state)
