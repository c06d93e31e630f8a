"""The `export` command: any checkpoint the platform writes -> a Hugging Face Mistral folder.

    python -m moxin_lightning export --checkpoint runs/local/checkpoints/last.ckpt --out exports/local

The folder (safetensors shards, `config.json` with the window and RoPE base, `generation_config.json`, the
tokenizer) loads with `transformers.AutoModelForCausalLM.from_pretrained` and gives the same logits
(`hf.export_hf`, tested). A training checkpoint carries its tokenizer; for one that does not, pass
`--tokenizer`. The destination is checked before anything is loaded, and written atomically.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from moxin_lightning.checkpoint import load_model
from moxin_lightning.hf import DEFAULT_MAX_SHARD_BYTES, export_hf
from moxin_lightning.release.write import DTYPES

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1024' -> bytes (decimal units, as Hugging Face's max_shard_size)."""
    match = _SIZE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"--max_shard_size {text!r} is not a size; write e.g. 5GB, 500MB or a byte count")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write `checkpoint` as a Hugging Face folder at `out`; returns the folder."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise FileExistsError(f"{out} is not a Hugging Face folder; --overwrite replaces only one, pick another --out")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    loaded = load_model(checkpoint, tokenizer=tokenizer, dtype=DTYPES[dtype] if dtype else None)
    return export_hf(loaded.model, out, loaded.tokenizer, max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def _run(args: argparse.Namespace) -> None:
    folder = export_checkpoint(
        args.checkpoint,
        args.out,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        max_shard_bytes=parse_size(args.max_shard_size),
        overwrite=args.overwrite,
    )
    files = sorted(item.name for item in folder.iterdir())
    print(f"wrote {folder}: {', '.join(files)}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "export", help="write a checkpoint as a Hugging Face folder", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a .ckpt file, a sharded checkpoint folder, or a release / HF folder"
    )
    parser.add_argument("--out", required=True, help="the folder to create")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for a checkpoint that holds none")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="store the weights as (default: as is)")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.set_defaults(run=_run)
