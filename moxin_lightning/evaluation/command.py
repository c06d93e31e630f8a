"""The `eval` command: lm-evaluation-harness on a checkpoint, through our backbone or the exported HF folder.

    python -m moxin_lightning eval --checkpoint runs/phase1/release --tasks moxin_local

Everything a run can trip on is checked before the model loads: the checkpoint exists, every task name is
known (an unknown one is reported with close names), a task that runs model-written code (humaneval) is
allowed by HF_ALLOW_CODE_EVAL=1, and every task's dataset can be read. The Hugging Face
Hub is not contacted unless the user allows it (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE default to 1 here), so a
Hub task whose dataset is not cached fails at once with the fix, instead of hanging on a network timeout.
`--backend hf` runs lm-eval's own `HFLM` on the Hugging Face folder (a training checkpoint is exported to a
temporary folder first): the reference our `MoxinLM` is tested against.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from moxin_lightning.evaluation.task_sets import code_execution_allowed, parse_task_names, resolve_tasks
from moxin_lightning.release.write import DTYPES

BACKENDS = ("moxin", "hf")


def default_output(checkpoint: Path, backend: str, names: list[str]) -> Path:
    """Beside the checkpoint, never inside it: `<folder>-eval/<backend>-<tasks>.json` for a folder (a release is
    replaced whole by the next promotion, and its contents are what its fingerprints and model card describe),
    `<folder of the .ckpt>/eval/<file stem>-<backend>-<tasks>.json` for a checkpoint file."""
    tasks = re.sub(r"[^A-Za-z0-9._+-]+", "_", "+".join(names))[:120]
    if checkpoint.is_dir():
        folder = checkpoint.resolve()
        return folder.with_name(f"{folder.name}-eval") / f"{backend}-{tasks}.json"
    return checkpoint.parent / "eval" / f"{checkpoint.stem}-{backend}-{tasks}.json"


def run_eval(
    checkpoint: str | Path,
    tasks: str,
    *,
    backend: str = "moxin",
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    output: str | Path | None = None,
    tokenizer: str | Path | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    max_length: int | None = None,
    seed: int | None = None,
    bootstrap_iters: int = 100_000,
) -> tuple[dict[str, Any], Path]:
    """Evaluate and write the harness's results JSON; returns (results, where they were written)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before `datasets` is imported: it reads them once
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    source = Path(checkpoint).expanduser()
    if not source.exists():
        raise FileNotFoundError(
            f"checkpoint {source} does not exist; pass a release or HF folder, a .ckpt file or a sharded "
            "checkpoint folder"
        )
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if batch_size < 1:
        raise ValueError(f"--batch_size {batch_size} must be >= 1")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit {limit} must be > 0 (a count, or a fraction below 1)")
    from moxin_lightning.checkpoint import check_device

    check_device(device)  # before lm_eval and the weights load: one line, not torch's CUDA assertion
    names = parse_task_names(tasks)
    target = Path(output).expanduser() if output else default_output(source, backend, names)
    if target.is_dir():
        raise IsADirectoryError(f"--output {target} is a folder; give a file name such as {target / 'results.json'}")

    try:
        import lm_eval
    except ImportError:
        raise ValueError(
            "the eval command needs lm-evaluation-harness: pip install -e '.[eval]' (lm_eval==0.4.13)"
        ) from None

    manager, built = resolve_tasks(names)
    seeds = (
        {}
        if seed is None
        else dict(random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    )
    started = time.perf_counter()
    with ExitStack() as stack:
        lm = _build_lm(backend, source, tokenizer, device, dtype, batch_size, max_length, seed, stack)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=built,
            task_manager=manager,
            num_fewshot=num_fewshot,
            limit=int(limit) if limit is not None and limit >= 1 else limit,
            log_samples=False,
            bootstrap_iters=bootstrap_iters,
            confirm_run_unsafe_code=code_execution_allowed(),  # resolve_tasks refused such tasks without the opt-in
            **seeds,
        )
    results["config"]["model"] = backend
    results["config"]["model_args"] = {
        "checkpoint": str(source), "tokenizer": str(tokenizer) if tokenizer else None, "dtype": dtype,
        "max_length": max_length, "seed": seed,
    }  # fmt: skip
    results["config"]["wall_seconds"] = round(time.perf_counter() - started, 3)
    _write_json(target, results)
    return results, target


def _build_lm(backend, source, tokenizer, device, dtype, batch_size, max_length, seed, stack: ExitStack):
    if backend == "moxin":
        from moxin_lightning.evaluation.lm import MoxinLM

        return MoxinLM(
            checkpoint=source, tokenizer=tokenizer, device=device, dtype=dtype, batch_size=batch_size,
            max_length=max_length, seed=seed or 0,
        )  # fmt: skip
    folder = source
    if tokenizer is not None or not (source / "config.json").is_file():
        from moxin_lightning.export import export_checkpoint

        folder = export_checkpoint(
            source, Path(stack.enter_context(tempfile.TemporaryDirectory())) / "hf", tokenizer=tokenizer
        )
    return hf_lm(folder, device=device, dtype=dtype, batch_size=batch_size, max_length=max_length)


def hf_lm(
    folder: str | Path,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
):
    """lm-eval's HFLM on a Hugging Face folder, its SentencePiece tokenizer opened as HF's LlamaTokenizer (the
    class the release's tokenizer_config.json names), so that both backends read the very same pieces."""
    import transformers
    from lm_eval.models.huggingface import HFLM

    folder = Path(folder)
    if not ((folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file()):
        raise ValueError(
            f"{folder} has no tokenizer.model or tokenizer.json; --backend hf needs a SentencePiece tokenizer "
            "(or use --backend moxin)"
        )
    hf_tokenizer = transformers.LlamaTokenizer.from_pretrained(str(folder))
    return HFLM(
        pretrained=str(folder), tokenizer=hf_tokenizer, device=device, dtype=dtype or "auto", batch_size=batch_size,
        max_length=max_length,
    )  # fmt: skip


def _write_json(path: Path, results: dict[str, Any]) -> None:
    """The whole file or nothing: written to a temporary sibling, then renamed over `path`."""
    from lm_eval.utils import handle_non_serializable

    from moxin_lightning.atomic import written_file

    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"
    with written_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def _run(args: argparse.Namespace) -> None:
    if not args.verbose:
        for name in ("lm_eval", "lm-eval", "transformers", "datasets"):
            logging.getLogger(name).setLevel(logging.ERROR)
    results, target = run_eval(
        args.checkpoint, args.tasks, backend=args.backend, num_fewshot=args.num_fewshot, limit=args.limit,
        batch_size=args.batch_size, output=args.output, tokenizer=args.tokenizer, device=args.device,
        dtype=args.dtype, max_length=args.max_length, seed=args.seed, bootstrap_iters=args.bootstrap_iters,
    )  # fmt: skip
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    print(f"wrote {target} ({results['config']['wall_seconds']:.1f} s)", file=sys.stderr)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "eval", help="run lm-evaluation-harness tasks on a checkpoint", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a release / HF folder, a .ckpt file or a sharded checkpoint"
    )
    parser.add_argument(
        "--tasks", required=True,
        help="comma-separated lm-eval tasks or groups: moxin_local (offline), moxin_fewshot, moxin_zeroshot, ...",
    )  # fmt: skip
    parser.add_argument(
        "--num_fewshot", type=int, default=None, help="override the tasks' few-shot count (not 0-shot configs)"
    )
    parser.add_argument(
        "--limit", type=float, default=None, help="examples per task (a fraction if below 1); for quick checks"
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--backend", default="moxin", choices=BACKENDS, help="moxin: our backbone; hf: lm-eval's HFLM")
    parser.add_argument(
        "--output", default=None, help="results JSON (default: beside the checkpoint, in <folder>-eval/)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer for a checkpoint that holds none")
    parser.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="cast the weights (default: as stored)")
    parser.add_argument(
        "--max_length", type=int, default=None, help="longest token window (default: the model's max_seq_len)"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seeds of few-shot sampling and sampled generation (default: lm-eval's)"
    )
    parser.add_argument("--bootstrap_iters", type=int, default=100_000, help="bootstrap stderr resamples (0: none)")
    parser.add_argument("--verbose", action="store_true", help="show lm-eval's log messages")
    parser.set_defaults(run=_run)
