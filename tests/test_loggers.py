"""The W&B logger's online/offline decision, an offline run's files, and the CSV alternative."""

from __future__ import annotations

import json
import struct

import pytest
import wandb
from lightning.pytorch.loggers import CSVLogger

from moxin_lightning.callbacks.throughput import TrainingSpeed
from moxin_lightning.loggers import WandbLogger, api_key_configured, choose_mode
from tests.test_throughput import BATCH, PEAK, SEQ, SpeedProbe, loader, logged_rows, make_trainer

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"
_CREDENTIAL_VARIABLES = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "NETRC", "WANDB_CONFIG_DIR")


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """A process environment with no W&B key anywhere: empty HOME, no credential variables."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in (*_CREDENTIAL_VARIABLES, "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def test_the_mode_follows_the_configured_key(tmp_path):
    home = tmp_path
    env = {"HOME": str(home)}
    assert (api_key_configured(env), choose_mode(None, env)) == (False, "offline")
    assert choose_mode(None, {**env, "WANDB_API_KEY": FAKE_KEY}) == "online"
    assert choose_mode(None, {**env, "WANDB_IDENTITY_TOKEN_FILE": str(home / "token")}) == "online"

    (home / ".netrc").write_text(f"machine other.example.com login user password {FAKE_KEY}\n")
    assert choose_mode(None, env) == "offline"  # a key for another host does not count
    assert choose_mode(None, {**env, "WANDB_BASE_URL": "https://other.example.com"}) == "online"
    (home / ".netrc").write_text(f"machine api.wandb.ai login user password {FAKE_KEY}\n")
    assert choose_mode(None, env) == "online"
    (home / ".netrc").unlink()

    (home / ".config" / "wandb").mkdir(parents=True)
    (home / ".config" / "wandb" / "settings").write_text(f"[default]\napi_key = {FAKE_KEY}\n")
    assert choose_mode(None, env) == "online"


def test_explicit_offline_and_wandb_mode_take_precedence(tmp_path):
    env = {"HOME": str(tmp_path)}
    keyed = {**env, "WANDB_API_KEY": FAKE_KEY}
    assert choose_mode(True, keyed) == "offline"
    assert choose_mode(False, env) == "online"
    assert choose_mode(None, {**keyed, "WANDB_MODE": "offline"}) == "offline"
    assert choose_mode(None, {**env, "WANDB_MODE": "dryrun"}) == "offline"
    assert choose_mode(None, {**env, "WANDB_MODE": "disabled"}) == "disabled"
    assert choose_mode(None, {**env, "WANDB_MODE": "online"}) == "online"
    assert choose_mode(None, {**env, "WANDB_MODE": "shared"}) == "shared"
    with pytest.raises(
        ValueError, match="WANDB_MODE='sometimes' is not a wandb mode; use online, offline, disabled or shared"
    ):
        choose_mode(None, {**env, "WANDB_MODE": "sometimes"})


def test_uploading_checkpoints_without_a_key_is_a_clear_error(no_credentials):
    with pytest.raises(ValueError, match="log_model=True uploads checkpoints but W&B runs offline here"):
        WandbLogger(project="moxin-test", log_model=True)


def test_without_a_key_the_run_is_offline_under_save_dir(no_credentials, tmp_path):
    logger = WandbLogger(project="moxin-test", save_dir=tmp_path / "runs")
    assert logger.mode == "offline"
    csv_logger = CSVLogger(tmp_path, name="csv", version=0)  # the same figures, read back for comparison
    trainer = make_trainer(tmp_path, [TrainingSpeed(peak_flops=PEAK)], max_steps=2, logger=[logger, csv_logger])
    trainer.fit(SpeedProbe(), loader())
    run = logger.experiment
    assert run.settings.mode == "offline"
    run.finish()
    wandb.teardown()  # stops wandb's service process, which writes the run file asynchronously: now it is complete

    (run_file,) = (tmp_path / "runs" / "wandb").glob(f"offline-run-*-{run.id}/run-{run.id}.wandb")
    names = ["trainer/global_step", "train/loss", "train/tokens_per_s", "train/mfu", "train/tokens_seen"]
    in_wandb = [[row[name] for name in names] for row in wandb_history(run_file.read_bytes()) if names[-1] in row]
    in_csv = [[row["step"]] + [row[name] for name in names[1:]] for row in logged_rows(tmp_path)]
    assert in_wandb == in_csv
    assert [row[-1] for row in in_wandb] == [BATCH * SEQ, 2 * BATCH * SEQ]


def test_csv_logger_records_the_speed_metrics(tmp_path):
    make_trainer(
        tmp_path, [TrainingSpeed(peak_flops=PEAK)], max_steps=2, logger=CSVLogger(tmp_path, name="csv", version=0)
    ).fit(SpeedProbe(), loader())
    rows = logged_rows(tmp_path)
    assert {"train/loss", "train/tokens_per_s", "train/mfu", "train/tokens_seen"} <= rows[0].keys()
    assert [(row["step"], row["train/tokens_seen"]) for row in rows] == [(0, BATCH * SEQ), (1, 2 * BATCH * SEQ)]


def wandb_history(data: bytes) -> list[dict]:
    """The `run.log` rows of a .wandb file: a 7-byte W&B header, then LevelDB-log records of protobuf `Record`s.

    LevelDB log: 32 KiB blocks of chunks (crc32c:4, length:2 little-endian, type:1, payload); a record is one
    FULL chunk (type 1) or FIRST, MIDDLE..., LAST chunks (2, 3, 4); a block tail shorter than a chunk header
    is padding.
    """
    from wandb.proto import wandb_internal_pb2

    assert data[:4] == b":W&B"
    block, position, pieces, rows = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        pieces += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
                )
    return rows
