"""What both benchmarks need to build the pair of models they compare and to describe the run.

`bench/train_step.py` and `bench/generate.py` compare our `Transformer` against Hugging Face
`MistralForCausalLM` on the same weights; the comparison only means something if both scripts build that pair
the same way and record the same facts about the machine. So the pair builder, the attention setting of the HF
side, the fields that open and close each JSON record and the results-file append live here once.

The scripts are run as `python bench/<script>.py`, which puts `bench/` on `sys.path`, so they import this
module as plain `common`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moxin_lightning.hf import config_to_hf, to_hf_state_dict
from moxin_lightning.model.config import ModelConfig
from moxin_lightning.model.transformer import Transformer

if TYPE_CHECKING:
    from transformers import MistralForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# HF's fastest CPU path; recorded in every result row as hf_attn_implementation.
HF_ATTENTION = "sdpa"


def parse_window(text: str) -> int | None:
    """argparse type for a sliding window: an int, or 'none' / 'null' / 'full' for full attention."""
    return None if text.lower() in ("none", "null", "full") else int(text)


def build_models(
    config: ModelConfig, dtype: torch.dtype, device: str, seed: int
) -> tuple[Transformer, MistralForCausalLM]:
    """Our model with seeded random weights, and HF Mistral holding a copy of exactly those weights.

    Loading through `to_hf_state_dict` (strict) makes both compute the same function, so any speed difference
    is the implementation's. Train/eval mode and HF's cache or generation settings are left to the caller:
    they differ between training and generation.
    """
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    ours = Transformer(config).to(device=device, dtype=dtype)
    hf_config = config_to_hf(config, dtype)
    for key in ("dtype", "torch_dtype"):
        hf_config.pop(key, None)
    hf = MistralForCausalLM._from_config(MistralConfig(**hf_config), attn_implementation=HF_ATTENTION, dtype=dtype)
    hf = hf.to(device)
    hf.load_state_dict(to_hf_state_dict(ours), strict=True)
    return ours, hf


def sync(device: str) -> None:
    """Wait for queued GPU work, so that wall-clock timings cover it (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def transformers_version() -> str:
    """The installed transformers version, imported lazily like the HF model itself."""
    import transformers

    return transformers.__version__


def record_start(bench: str, preset: str, config: ModelConfig, params: int) -> dict:
    """The fields that start every JSON record: which benchmark, when, and which model it ran.

    Splice it first (`{**record_start(...), ...}`) so the keys keep the order of the records already in
    `bench/results/`.
    """
    return {
        "bench": bench,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "preset": preset,
        "config": config.to_dict(),
        "params": params,
    }


def environment(device: str, load_before: float) -> dict:
    """The fields that end every JSON record: versions, threads and machine, to judge how comparable runs are.

    `load_before` is the 1-minute load average taken before the timed loop; the one after is taken here, so
    call this once the timing is done.
    """
    return {
        "torch": torch.__version__,
        "transformers": transformers_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m_before_after": [load_before, os.getloadavg()[0]],
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
    }


def append_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Append one JSON line per row to `path` (parents created), keeping earlier runs; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")
    return out
