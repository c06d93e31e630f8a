"""Hyperparameter sweeps: W&B sweep specs (sweeps/*.yaml), run online by `wandb agent` or offline here.

- `spec.py`: read and check a spec; its parameters as Optuna distributions, its sampler and pruner
- `command.py`: a trial's command line, macros expanded as W&B's agent does
- `trial.py`: run one trial as a child process and read its metrics file
- `runner.py`: the Optuna study (sqlite, continued on rerun), one trial after another
- `results.py`: results.json / results.csv and the table, best first
- `cli.py`: the `sweep` command
"""

from moxin_lightning.sweep.cli import register

__all__ = ["register"]
