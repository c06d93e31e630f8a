"""The shared task base and Pretrain: schedule, parameter groups, seeded init, loss normalisation, evaluation
metrics and `init_from` (release / Hugging Face folder / Lightning checkpoint), with their one-line errors."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from moxin_lightning.hf import CheckpointError, export_hf
from moxin_lightning.model.transformer import same_weights
from moxin_lightning.schedules import check_schedule, lr_factor
from moxin_lightning.tasks import Pretrain, TrainingTask
from moxin_lightning.tasks.base import TrainingTask as Base

TINY = dict(
    vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, max_seq_len=128,
    sliding_window=16,
)  # fmt: skip


def task(**kwargs) -> Pretrain:
    settings = dict(preset="moxin-tiny-9m", model_overrides=TINY, lr=1e-3, warmup_steps=2)
    module = Pretrain(**{**settings, **kwargs})
    module.configure_model()
    return module


def batches(count: int, rows: int = 2, length: int = 24, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random packed rows with two documents each and unevenly masked labels (so token counts differ)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for index in range(count):
        ids = torch.randint(3, 256, (rows, length), generator=generator)
        doc_ids = (torch.arange(length) >= length // 3).long().expand(rows, length).clone()
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = -100
        labels[:, : 2 + 5 * (index % 3)] = -100  # a different count of targets in every batch
        out.append({"input_ids": ids, "labels": labels, "doc_ids": doc_ids})
    return out


class Loader:
    """A fixed list of batches that Lightning treats as one sized loader."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


def reference_mean_loss(module: Pretrain, items) -> torch.Tensor:
    """Token-weighted mean cross-entropy from full logits (no fusion, no accumulation logic)."""
    total, count = torch.zeros(()), 0
    for batch in items:
        logits = module.model(batch["input_ids"], doc_ids=batch["doc_ids"])
        total = total + F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
        count += int((batch["labels"] != -100).sum())
    return total / count


def trainer(**kwargs) -> L.Trainer:
    settings = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    return L.Trainer(**{**settings, **kwargs})


# -- schedule ---------------------------------------------------------------------------------------------


def test_cosine_warms_up_then_decays_to_the_floor():
    factor = [lr_factor(s, total_steps=100, warmup_steps=10, kind="cosine", min_lr_ratio=0.1) for s in range(100)]
    assert factor[0] == pytest.approx(0.1) and factor[9] == pytest.approx(1.0)
    assert factor[10] == pytest.approx(1.0)
    assert factor[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, total_steps=100, warmup_steps=10, kind="cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factor[10:], factor[11:], strict=False))


def test_wsd_is_flat_until_the_decay_window_and_linear_after_it():
    f = [
        lr_factor(s, total_steps=100, warmup_steps=10, kind="wsd", min_lr_ratio=0.0, decay_ratio=0.2)
        for s in range(101)
    ]
    assert f[10:80] == [1.0] * 70
    assert f[90] == pytest.approx(0.5) and f[100] == pytest.approx(0.0)
    assert lr_factor(50, total_steps=100, warmup_steps=0, kind="linear", min_lr_ratio=0.0) == pytest.approx(0.5)
    assert lr_factor(99, total_steps=100, warmup_steps=5, kind="constant") == 1.0


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(kind="step"), "unknown schedule 'step'"),
        (dict(min_lr_ratio=1.5), "min_lr_ratio=1.5 must be within [0, 1]"),
        (dict(warmup_steps=100), "warmup_steps=100 is not shorter than the run (100 steps)"),
        (dict(decay_ratio=0.0), "decay_ratio=0.0 must be within (0, 1]"),
    ],
)
def test_bad_schedules_are_one_line_errors(settings, message):
    values = dict(kind="cosine", warmup_steps=10, total_steps=100, min_lr_ratio=0.1, decay_ratio=0.2, **{})
    values.update(settings)
    kind = values.pop("kind")
    with pytest.raises(ValueError) as error:
        check_schedule(kind, **values)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_optimizer_follows_the_schedule_step_by_step():
    module = task(warmup_steps=3, min_lr_ratio=0.1)
    seen = []

    class RecordLr(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer(max_steps=8, callbacks=[RecordLr()]).fit(module, Loader(batches(8)))
    expected = [1e-3 * lr_factor(s, total_steps=8, warmup_steps=3, kind="cosine", min_lr_ratio=0.1) for s in range(8)]
    assert seen == pytest.approx(expected, rel=1e-12)


def test_a_run_without_max_steps_is_refused_before_training():
    from types import SimpleNamespace

    module = task()
    module._trainer = SimpleNamespace(estimated_stepping_batches=float("inf"))  # an endless stream, no max_steps
    with pytest.raises(ValueError, match="the run has no length: set trainer.max_steps"):
        module.configure_optimizers()


# -- parameters ------------------------------------------------------------------------------------------


def test_weight_decay_applies_to_matrices_only():
    module = task(weight_decay=0.1)
    module.trainer = trainer(max_steps=10)  # estimated_stepping_batches = max_steps
    decay, no_decay = module.configure_optimizers()["optimizer"].param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed == sorted(n for n in names.values() if n.endswith("proj.weight") or n == "lm_head.weight")
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(
        n for n in names.values() if n.endswith("norm.weight") or n == "embed.weight"
    )
    assert module.configure_optimizers()["optimizer"].defaults["betas"] == (0.9, 0.95)


def test_weight_decay_scope_all_decays_every_parameter_as_moxins_script_does():
    module = task(weight_decay=0.1, weight_decay_scope="all", betas=(0.9, 0.999))
    module.trainer = trainer(max_steps=10)
    optimizer = module.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert [id(p) for p in decay["params"]] == [id(p) for p in module.model.parameters()]
    assert (decay["weight_decay"], no_decay["params"], optimizer.defaults["betas"]) == (0.1, [], (0.9, 0.999))
    # one AdamW step from zero gradients moves every parameter by -lr * wd * p, norms and embedding included
    before = [p.detach().clone() for p in module.model.parameters()]
    for p in module.model.parameters():
        p.grad = torch.zeros_like(p)
    lr = decay["lr"]
    assert lr > 0
    optimizer.step()
    for old, new in zip(before, module.model.parameters(), strict=True):
        torch.testing.assert_close(new.detach(), old * (1 - lr * 0.1))
    with pytest.raises(ValueError, match=r"^weight_decay_scope='norms' is not one of matrices, all$"):
        task(weight_decay_scope="norms")


def test_initial_weights_depend_only_on_the_seed_and_follow_the_init_rule():
    a, b, c = task(seed=7), task(seed=7), task(seed=8)
    assert same_weights(a.model, b.model)
    assert not torch.equal(a.model.embed.weight, c.model.embed.weight)
    big = Pretrain(preset="moxin-tiny-9m", model_overrides={**TINY, "dim": 256, "ffn_dim": 512}, seed=0)
    big.configure_model()
    std = big.model_config.init_std
    assert big.model.blocks[0].attn.q_proj.weight.std().item() == pytest.approx(std, rel=0.02)
    residual = std / math.sqrt(2 * big.model_config.n_layers)
    assert big.model.blocks[1].mlp.down_proj.weight.std().item() == pytest.approx(residual, rel=0.02)
    assert torch.equal(big.model.norm.weight, torch.ones(256))


def test_the_base_task_cannot_be_configured_without_an_objective():
    with pytest.raises(TypeError, match="defines no loss_terms; use a task such as moxin_lightning.tasks.Pretrain"):
        TrainingTask(preset="moxin-tiny-9m")
    assert Base is TrainingTask


# -- loss normalisation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("accumulate", [1, 3])
def test_the_step_gradient_is_the_mean_over_all_its_target_tokens(accumulate):
    """Micro-batches with different target counts: the gradient of the step equals that of the token-weighted
    mean over all of them (not the mean of the micro-batch means), and so does the logged loss."""
    items = batches(accumulate, seed=3)
    reference = task(seed=1, warmup_steps=0)
    reference_loss = reference_mean_loss(reference, items)
    reference_loss.backward()
    expected = {n: p.grad.clone() for n, p in reference.model.named_parameters()}

    module, seen = task(seed=1, warmup_steps=0), {}

    class Grab(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # grads stay until next step
            if batch_idx + 1 < accumulate:
                return
            seen.update({n: p.grad.clone() for n, p in pl_module.model.named_parameters()})
            seen["loss"] = trainer.callback_metrics["train/loss"].clone()

    trainer(max_steps=1, accumulate_grad_batches=accumulate, callbacks=[Grab()]).fit(module, Loader(items))
    assert seen["loss"].item() == pytest.approx(reference_loss.item(), rel=1e-5)
    for name, grad in expected.items():
        torch.testing.assert_close(seen[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_gradient_norm_is_logged_before_clipping_and_clipping_holds():
    module, seen = task(seed=2, warmup_steps=0), {}

    class Grab(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            grads = [p.grad for p in pl_module.model.parameters()]
            seen["after"] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            seen["logged"] = trainer.callback_metrics["train/grad_norm"].clone()

    items = batches(1, seed=5)
    reference = task(seed=2)
    reference_mean_loss(reference, items).backward()
    before = torch.nn.utils.get_total_norm([p.grad for p in reference.model.parameters()])
    trainer(max_steps=1, gradient_clip_val=0.05, callbacks=[Grab()]).fit(module, Loader(items))
    assert seen["logged"].item() == pytest.approx(before.item(), rel=1e-4)
    assert before.item() > 0.05 and seen["after"].item() == pytest.approx(0.05, rel=1e-4)


# -- evaluation ----------------------------------------------------------------------------------------------


def test_validation_and_test_report_token_weighted_loss_and_perplexity():
    module, items = task(seed=4), batches(3, seed=9)
    expected = reference_mean_loss(module, items).item()
    result = trainer().validate(module, Loader(items), verbose=False)[0]
    assert result["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert result["val/ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert trainer().test(module, Loader(items), verbose=False)[0]["test/loss"] == pytest.approx(expected, rel=1e-5)


def test_rope_theta_change_reaches_the_model():
    module = task()
    before = module.model(batches(1)[0]["input_ids"])
    module.set_rope_theta(500_000.0)
    assert module.model.config.rope_theta == 500_000.0 == module.model_config.rope_theta
    assert not torch.allclose(module.model(batches(1)[0]["input_ids"]), before)


# -- init_from -------------------------------------------------------------------------------------------------


def test_init_from_a_hugging_face_or_release_folder_loads_its_weights(tmp_path):
    source = task(seed=11)
    export_hf(source.model, tmp_path / "hf")
    loaded = task(init_from=str(tmp_path / "hf"), seed=0)
    assert same_weights(source.model, loaded.model)


def test_init_from_a_lightning_checkpoint_file_loads_its_weights(tmp_path):
    source = task(seed=12)
    run = trainer(max_steps=3, default_root_dir=tmp_path)
    run.fit(source, Loader(batches(3)))
    run.save_checkpoint(tmp_path / "run.ckpt")
    loaded = task(init_from=str(tmp_path / "run.ckpt"))
    assert same_weights(source.model, loaded.model)
    saved = torch.load(tmp_path / "run.ckpt", weights_only=True)
    assert saved["model_config"]["dim"] == 64  # checkpoints describe their model


def written(path, content: bytes):
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "nowhere", "does not exist; point it at a release folder, a Hugging Face folder or a .ckpt"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "is neither a Hugging Face/release folder"),
        (lambda p: written(p / "x.ckpt", b"not a checkpoint"), "cannot read"),
    ],
)
def test_bad_init_from_paths_are_one_line_errors(tmp_path, make, message):
    with pytest.raises(CheckpointError) as error:
        task(init_from=str(make(tmp_path)))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_init_from_a_different_model_names_the_differences(tmp_path):
    export_hf(task(model_overrides={**TINY, "n_layers": 3}).model, tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"is a different model: n_layers 3 \(configured 2\)"):
        task(init_from=str(tmp_path / "hf"))


@pytest.mark.slow
def test_compiled_and_checkpointed_blocks_train_exactly_like_eager_ones():
    """configure_model's order (activation checkpointing, then torch.compile per block) changes no number."""

    def losses(**kwargs) -> list[float]:
        module, seen = task(seed=3, warmup_steps=0, **kwargs), []

        class Record(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                seen.append(trainer.callback_metrics["train/loss"].item())

        trainer(max_steps=4, callbacks=[Record()]).fit(module, Loader(batches(4)))
        assert all(block._compiled_call_impl is not None for block in module.model.blocks) == kwargs.get(
            "compile", False
        )
        return seen

    eager = losses()
    assert losses(compile=True) == pytest.approx(eager, rel=1e-5)
    assert losses(compile=True, activation_checkpointing=True) == pytest.approx(eager, rel=1e-5)


def test_sft_mean_weights_each_conversation_equally():
    from moxin_lightning.tasks.sft import per_conversation_weights

    labels = torch.tensor([[5, 6, -100, 7, -100, -100], [-100, 8, 9, 9, 9, -100]])
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 1]])
    weights, conversations = per_conversation_weights(labels, doc_ids)
    expected = torch.tensor([[0.5, 0.5, 0, 1.0, 0, 0], [0, 1.0, 1 / 3, 1 / 3, 1 / 3, 0]])
    torch.testing.assert_close(weights, expected)
    assert conversations.item() == 4  # conversation 2 of row 0 has no assistant token
