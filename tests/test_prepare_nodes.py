"""`prepare` across nodes: two `prepare` processes as two nodes of one machine (`--num_nodes 2 --node_rank 0|1`,
one shared output folder) make exactly the dataset one node makes: same manifest split hashes and counts, same
fingerprint, same token streams (documents) and items (chat records); and the rules that pick the nodes, and the
one-line refusals (a node given other arguments, a missing --num_workers, an object-store output without a
shared folder).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moxin_lightning.data import DataError, read_manifest
from moxin_lightning.data.nodes import Nodes, resolve_nodes
from moxin_lightning.data.prepare import prepare
from moxin_lightning.data.shards import read_tokens
from tests.prepared_data import fresh_environment, train_tiny_bpe, write_records
from tests.s3_server import s3_fixture  # noqa: F401  (the `s3` fixture)

WORDS = "the quick brown fox jumps over a lazy dog while tokens flow into shards across two nodes".split()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    return train_tiny_bpe(tmp_path_factory.mktemp("tokenizer"), WORDS)


def sentence(seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))


def document_files(folder: Path, count: int = 5) -> str:
    """`count` jsonl files of 12 documents each (5 files: litdata gives node 0 two of them, node 1 three)."""
    folder.mkdir()
    for file in range(count):
        write_records(folder / f"part-{file}.jsonl", [{"text": sentence(100 * file + i)} for i in range(12)])
    return str(folder / "*.jsonl")


def chat_files(folder: Path, count: int = 4) -> str:
    folder.mkdir()
    for file in range(count):
        conversations = [
            {
                "messages": [
                    {"role": "user", "content": sentence(1000 * file + i) + "?"},
                    {"role": "assistant", "content": sentence(1000 * file + i + 500) + "."},
                ]
            }
            for i in range(8)
        ]
        write_records(folder / f"chat-{file}.jsonl", conversations)
    return str(folder / "*.jsonl")


def run_nodes(
    tmp_path: Path, args: list[str], num_nodes: int = 2, timeout: float = 120
) -> list[subprocess.CompletedProcess]:
    """`python -m moxin_lightning prepare ARGS --num_nodes N --node_rank R` for every R, started together."""
    env = fresh_environment(tmp_path)
    for key in ("DATA_OPTIMIZER_NUM_NODES", "DATA_OPTIMIZER_NODE_RANK", "SLURM_STEP_NUM_TASKS", "GROUP_RANK"):
        env.pop(key, None)
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "moxin_lightning", "prepare", *args, "--num_nodes", str(num_nodes)]
            + ["--node_rank", str(rank)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(num_nodes)
    ]
    done = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return done


def check_same_dataset(nodes_output: Path, single_output: Path, tmp_path: Path) -> dict:
    """Both are complete datasets with the same manifest identity; return the multi-node manifest."""
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("manifest.json")) == sorted(
        path.relative_to(tmp_path) for path in (nodes_output / "manifest.json", single_output / "manifest.json")
    )
    assert not list(nodes_output.parent.glob(f".{nodes_output.name}.*")), "the shared staging folder is left behind"
    ours, theirs = read_manifest(nodes_output), read_manifest(single_output)
    assert ours["fingerprint"] == theirs["fingerprint"]
    assert ours["splits"].keys() == theirs["splits"].keys() == {"train", "val"}
    for name, split in ours["splits"].items():
        assert {key: value for key, value in split.items() if key not in ("chunks", "chunk_sha256")} == {
            key: value for key, value in theirs["splits"][name].items() if key not in ("chunks", "chunk_sha256")
        }
    return ours


def test_documents_across_two_nodes_equal_one_node(tmp_path, tokenizer_path):
    inputs = document_files(tmp_path / "corpus")
    output = tmp_path / "shared" / "c1"
    common = ["--input", inputs, "--tokenizer", str(tokenizer_path), "--val_fraction", "0.2", "--num_workers", "1"]
    started = time.perf_counter()
    runs = run_nodes(tmp_path, [*common, "--output", str(output)])
    seconds = time.perf_counter() - started
    for rank, run in enumerate(runs):
        assert run.returncode == 0, f"node {rank}: {run.stderr[-2000:]}"
    assert "the last node (1) writes manifest.json" in runs[0].stdout
    assert runs[1].stdout.startswith(f"prepared {output}: train ")

    single = prepare([inputs], tokenizer_path, tmp_path / "single", val_fraction=0.2, num_workers=1)
    manifest = check_same_dataset(output, single, tmp_path)
    assert len(manifest["sources"]) == 5
    for split in ("train", "val"):
        ours = np.concatenate(list(read_tokens(output / split)))
        theirs = np.concatenate(list(read_tokens(single / split)))
        assert ours.size == manifest["splits"][split]["tokens"] > 0
        np.testing.assert_array_equal(ours, theirs)
    assert len(list((output / "train").glob("chunk-*.bin"))) == 2  # one per node: both nodes did work
    print(f"two nodes: {seconds:.1f} s")


def test_chat_records_across_two_nodes_equal_one_node(tmp_path, tokenizer_path):
    from litdata import StreamingDataset

    inputs = chat_files(tmp_path / "chats")
    output = tmp_path / "shared" / "sft"
    common = ["--format", "chat", "--input", inputs, "--tokenizer", str(tokenizer_path), "--max_length", "256"]
    common += ["--val_fraction", "0.25", "--num_workers", "1"]
    runs = run_nodes(tmp_path, [*common, "--output", str(output)])
    for rank, run in enumerate(runs):
        assert run.returncode == 0, f"node {rank}: {run.stderr[-2000:]}"

    single = prepare(
        [inputs], tokenizer_path, tmp_path / "single", format="chat", max_length=256, val_fraction=0.25, num_workers=1
    )
    manifest = check_same_dataset(output, single, tmp_path)
    assert manifest["splits"]["train"]["records"] + manifest["splits"]["val"]["records"] == 32
    for split in ("train", "val"):
        ours, theirs = StreamingDataset(str(output / split)), StreamingDataset(str(single / split))
        assert len(ours) == len(theirs) == manifest["splits"][split]["records"] > 0
        for index in range(len(ours)):
            mine, other = ours[index], theirs[index]
            assert mine.keys() == other.keys()
            for key in mine:
                np.testing.assert_array_equal(np.asarray(mine[key]), np.asarray(other[key]))


def test_two_nodes_to_an_object_store_build_in_the_shared_folder_and_the_last_node_uploads(
    tmp_path, tokenizer_path, s3
):
    inputs = document_files(tmp_path / "corpus", count=4)
    url = s3.url("nodes/c1")
    shared = tmp_path / "shared"
    common = ["--input", inputs, "--tokenizer", str(tokenizer_path), "--val_fraction", "0.2", "--num_workers", "1"]
    runs = run_nodes(tmp_path, [*common, "--output", url, "--shared_dir", str(shared)])
    for rank, run in enumerate(runs):
        assert run.returncode == 0, f"node {rank}: {run.stderr[-2000:]}"
    assert runs[1].stdout.startswith(f"prepared {url}: train ")

    single = prepare([inputs], tokenizer_path, tmp_path / "single", val_fraction=0.2, num_workers=1)
    uploaded = read_manifest(url)
    assert uploaded["fingerprint"] == read_manifest(single)["fingerprint"]
    assert "manifest.json" in s3.keys("nodes/c1") and "train/index.json" in s3.keys("nodes/c1")
    assert list(shared.iterdir()) == [], "the build folder and the staging folder are gone after the upload"


def test_a_node_given_other_arguments_is_refused_in_one_line(tmp_path, tokenizer_path):
    """The staging folder's name leaves --num_workers out, so both nodes meet there and the difference is named."""
    inputs = document_files(tmp_path / "corpus", count=4)
    output = tmp_path / "shared" / "c1"
    env = fresh_environment(tmp_path)
    base = [sys.executable, "-m", "moxin_lightning", "prepare", "--input", inputs, "--tokenizer", str(tokenizer_path)]
    base += ["--output", str(output), "--val_fraction", "0.2", "--num_nodes", "2"]
    processes = [
        subprocess.Popen([*base, "--node_rank", str(rank), "--num_workers", str(rank + 1)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]  # fmt: skip
    results = [process.communicate(timeout=120) for process in processes]
    assert processes[1].returncode != 0
    error = results[1][1].strip().splitlines()[-1]
    assert error.startswith("prepare: error: ") and "num_workers" in error and "every node must pass the same" in error
    assert not output.exists()
    assert not list(output.parent.glob(".c1.*")), "the last node deletes the shared staging folder"


@pytest.mark.parametrize(
    ("environ", "flags", "expected"),
    [
        ({}, (None, None), Nodes(1, 0)),
        ({"DATA_OPTIMIZER_NUM_NODES": "4", "DATA_OPTIMIZER_NODE_RANK": "2"}, (None, None), Nodes(4, 2)),
        ({"SLURM_STEP_NUM_TASKS": "3", "SLURM_STEP_NUM_NODES": "3", "SLURM_PROCID": "1"}, (None, None), Nodes(3, 1)),
        ({"SLURM_NNODES": "4", "SLURM_NODEID": "0"}, (None, None), Nodes(1, 0)),  # a batch script, not an srun step
        ({"WORLD_SIZE": "2", "GROUP_RANK": "1", "LOCAL_WORLD_SIZE": "1"}, (None, None), Nodes(2, 1)),
        ({"DATA_OPTIMIZER_NUM_NODES": "4", "DATA_OPTIMIZER_NODE_RANK": "2"}, (4, 3), Nodes(4, 3)),  # flags win
        ({"WORLD_SIZE": "2", "GROUP_RANK": "1", "LOCAL_WORLD_SIZE": "1"}, (None, 0), Nodes(2, 0)),
    ],
)
def test_nodes_come_from_flags_then_litdata_then_the_launcher(environ, flags, expected):
    assert resolve_nodes(*flags, environ=environ) == expected


@pytest.mark.parametrize(
    ("environ", "flags", "message"),
    [
        ({"SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NUM_NODES": "2"}, (None, None), r"^srun started 8 tasks on 2 nodes"),
        ({"WORLD_SIZE": "8", "GROUP_RANK": "0", "LOCAL_WORLD_SIZE": "4"}, (None, None), r"--nproc_per_node 1"),
        ({}, (2, None), r"^--num_nodes 2 needs --node_rank"),
        ({}, (2, 2), r"^--node_rank must be in 0 \.\. 1 for --num_nodes 2, got 2$"),
    ],
)
def test_nodes_refused_in_one_line(environ, flags, message):
    with pytest.raises(DataError, match=message):
        resolve_nodes(*flags, environ=environ)


def test_prepare_across_nodes_needs_workers_and_a_shared_folder_for_a_url(tmp_path, tokenizer_path):
    inputs = document_files(tmp_path / "corpus", count=2)
    with pytest.raises(DataError, match=r"^--num_nodes 2 needs --num_workers, the same on every node"):
        prepare([inputs], tokenizer_path, tmp_path / "out", num_nodes=2, node_rank=0)
    with pytest.raises(DataError, match=r"^--output s3://bucket/data with --num_nodes 2 needs --shared_dir"):
        prepare([inputs], tokenizer_path, "s3://bucket/data", num_nodes=2, node_rank=1, num_workers=1)
    assert not (tmp_path / "out").exists()


def test_single_node_ignores_litdata_nodes_left_in_the_environment(tmp_path, tokenizer_path, monkeypatch):
    """`prepare()` (what the datamodules call on first use) is one node whatever a launcher left in the environment."""
    monkeypatch.setenv("DATA_OPTIMIZER_NUM_NODES", "2")
    monkeypatch.setenv("DATA_OPTIMIZER_NODE_RANK", "0")
    output = prepare([document_files(tmp_path / "corpus", count=2)], tokenizer_path, tmp_path / "out", num_workers=1,
                     val_fraction=0.2)  # fmt: skip
    assert read_manifest(output)["splits"]["train"]["documents"] > 0
    assert os.environ["DATA_OPTIMIZER_NUM_NODES"] == "2"  # restored after optimize
    assert json.loads((output / "train" / "index.json").read_text())["chunks"]
