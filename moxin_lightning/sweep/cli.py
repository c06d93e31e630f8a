"""`python -m moxin_lightning sweep SPEC --trials N`: a W&B sweep spec run offline with Optuna."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="run a W&B sweep spec (sweeps/*.yaml) locally with Optuna: grid, random or bayes (TPE)",
        description="Run the trials of a W&B sweep spec locally: Optuna chooses the values (grid -> GridSampler, "
        "random -> RandomSampler, bayes -> TPE; hyperband early_terminate -> HyperbandPruner), each trial runs "
        "the spec's command as W&B's agent would. The study is kept in OUT/NAME/study.db: rerunning continues it.",
    )
    parser.add_argument("spec", help="the sweep YAML, e.g. sweeps/phase1-lr-warmup.yaml")
    parser.add_argument(
        "--trials", type=int, default=None, help="trials to add (default: the grid's remaining points, or run_cap)"
    )
    parser.add_argument("--out", default="runs/sweeps", help="the sweep's folder is OUT/NAME (default runs/sweeps)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler, for a reproducible search")
    parser.add_argument("--dry_run", action="store_true", help="print the next trials' commands; run nothing")
    parser.add_argument("--poll_s", type=float, default=1.0, help=argparse.SUPPRESS)  # tests poll faster
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> None:
    from moxin_lightning.sweep.runner import run_sweep
    from moxin_lightning.sweep.spec import load_spec

    spec = load_spec(args.spec)
    try:
        run_sweep(spec, out=args.out, trials=args.trials, seed=args.seed, dry_run=args.dry_run, poll_s=args.poll_s)
    except KeyboardInterrupt:
        print(
            f"\nsweep {spec.name}: interrupted; the running trial was stopped and recorded as failed", file=sys.stderr
        )
        sys.exit(130)
