"""One line, not a traceback: each mistake below once surfaced a Python traceback, or an error that did not name
its subject. Each runs through the real command line (a subprocess): exit status 2, stderr's last line exactly
the one-line message, no "Traceback" anywhere.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.prepared_data import fresh_environment, write_tiny_fit

ROOT = Path(__file__).resolve().parents[2]


def run(tmp_path: Path, *words: str) -> str:
    """Run `python -m moxin_lightning WORDS`; assert exit 2, one `error:` line, no traceback; the message."""
    result = subprocess.run(
        [sys.executable, "-m", "moxin_lightning", *words],
        cwd=ROOT, env={**fresh_environment(tmp_path), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [last], result.stderr
    return last


@pytest.fixture
def tiny_fit(tmp_path) -> Path:
    """A tiny pretraining config on a prepared folder (4 steps)."""
    return write_tiny_fit(tmp_path, "  max_steps: 4\n  logger: false\n")


def test_a_batch_size_below_1_names_the_key_and_the_datamodule(tmp_path, tiny_fit):
    assert run(tmp_path, "fit", "--config", str(tiny_fit), "--data.init_args.batch_size=0") == (
        "error: data.init_args.batch_size=0 must be >= 1 (moxin_lightning.datamodules.PretrainData); it counts rows "
        "(or records) per batch per device"
    )


def test_a_task_on_the_wrong_datamodule_names_both_and_the_missing_keys(tmp_path, tiny_fit):
    assert run(tmp_path, "fit", "--config", str(tiny_fit), "--model=moxin_lightning.tasks.DPO") == (
        "error: DPO needs batches with chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels, "
        "pair_index; PretrainData gives input_ids, labels, doc_ids (missing: chosen_input_ids, chosen_labels, "
        "rejected_input_ids, rejected_labels, pair_index); pair the task with its datamodule (see conf/)"
    )


def test_a_misspelled_model_override_names_it_and_the_closest_key(tmp_path, tiny_fit):
    assert run(tmp_path, "fit", "--config", str(tiny_fit), "--model.init_args.model_overrides.n_layer=3") == (
        "error: model_overrides: unknown key 'n_layer'; did you mean 'n_layers'? valid keys: vocab_size, dim, "
        "n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, norm_eps, rope_theta, sliding_window, max_seq_len, "
        "tie_embeddings, attention, init_std, bos_id, eos_id"
    )


def test_a_yaml_syntax_error_names_the_config_file_and_line(tmp_path, tiny_fit):
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_steps: 4\n  devices: [1\n")
    assert run(tmp_path, "fit", "--config", str(tiny_fit), "--config", str(broken)) == (
        f"error: {broken}, line 4, column 1: YAML syntax error: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence at line 3)"
    )


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_a_truncated_checkpoint_given_to_ckpt_path_is_named(tmp_path, tiny_fit, command):
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"PK\x03\x04" + b"\x00" * 60)  # the start of a zip, cut off
    message = run(tmp_path, command, "--config", str(tiny_fit), f"--ckpt_path={checkpoint}")
    assert message.startswith(f"error: cannot read checkpoint {checkpoint}: it is truncated, damaged or not a ")
    assert message.endswith("; resume from another checkpoint (e.g. an earlier one in the same folder)")


def test_a_truncated_manifest_is_named(tmp_path, tiny_fit):
    manifest = tmp_path / "data" / "manifest.json"
    manifest.write_text(manifest.read_text()[:25])
    assert run(tmp_path, "fit", "--config", str(tiny_fit)) == (
        f"error: {manifest} is not valid JSON (Unterminated string starting at at line 1 column 17): it is "
        f"truncated or was edited; prepare the dataset again (python -m moxin_lightning prepare ... --output "
        f"{tmp_path / 'data'})"
    )


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    from moxin_lightning.hf import export_hf
    from tests.conftest import tiny_model

    return export_hf(tiny_model(), tmp_path / "hf", None)


def test_a_truncated_config_json_is_named(tmp_path, hf_folder):
    config = hf_folder / "config.json"
    config.write_text(config.read_text()[:40])
    message = run(tmp_path, "generate", "--checkpoint", str(hf_folder), "--prompt", "hi")
    assert message.startswith(f"error: {config} is not valid JSON (")
    assert message.endswith("): it is truncated or was edited; download or export the folder again")


def test_a_nan_temperature_is_refused_by_generate(tmp_path):
    assert run(tmp_path, "generate", "--checkpoint", str(tmp_path), "--prompt", "hi", "--temperature", "nan") == (
        "error: --temperature nan must be a finite number >= 0 (0 = greedy)"
    )


def test_a_nan_temperature_is_refused_by_grpo(tmp_path):
    words = ["fit", "--config", "conf/grpo.yaml", "--config", "conf/grpo-local.yaml"]
    assert run(tmp_path, *words, "--model.init_args.temperature=.nan") == (  # YAML's NaN
        "error: need a finite temperature >= 0 and 0 < top_p <= 1; got nan, 1.0"
    )


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, hf_folder, command):
    words = ["--prompt", "hi"] if command == "generate" else ["--tasks", "hellaswag"]
    assert run(tmp_path, command, "--checkpoint", str(hf_folder), *words, "--device", "cuda") == (
        "error: --device cuda: no CUDA GPU is visible to this process; use --device cpu"
    )
