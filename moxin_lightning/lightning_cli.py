"""`MoxinCLI`: the `fit` / `validate` / `test` commands, a LightningCLI over our tasks and datamodules.

The task (`model:`) and the datamodule (`data:`) are chosen in YAML by `class_path`, so any subclass of
`tasks.TrainingTask` or `LightningDataModule` plugs in without code here. Configs use the `omegaconf+`
parser mode: several `--config` files merge key by key, then `${...}` interpolations resolve.
"""

from __future__ import annotations

import os

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI

from moxin_lightning.checkpoint_io import AtomicCheckpointIO
from moxin_lightning.errors import USER_ERRORS, exit_with
from moxin_lightning.tasks.base import TrainingTask

# our one-line input errors, plus Lightning's own config checks (same one-line style)
_USER_ERRORS = (*USER_ERRORS, MisconfigurationException)


class MoxinCLI(LightningCLI):
    """LightningCLI with our defaults: subclass mode for task and data, omegaconf+ configs, a fixed seed."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        super().__init__(
            model_class=TrainingTask,
            subclass_mode_model=True,
            datamodule_class=L.LightningDataModule,
            subclass_mode_data=True,
            seed_everything_default=1234,
            save_config_kwargs={"overwrite": True},  # a resumed run rewrites its config.yaml
            parser_kwargs={
                "parser_mode": "omegaconf+",
                **{cmd: {"parser_mode": "omegaconf+"} for cmd in ("fit", "validate", "test")},
            },
            auto_configure_optimizers=False,  # the task owns AdamW and the schedule
            args=args,
            run=run,
        )

    def before_instantiate_classes(self) -> None:
        """Keep the merged, resolved config as text: releases (CheckpointPromotion) ship it."""
        subcommand = self.subcommand
        config = self.config[subcommand] if subcommand else self.config
        self.resolved_config = self._parser(subcommand).dump(config, skip_none=False)  # as --print_config

    def _attach_config(self) -> None:
        self.trainer.resolved_config = self.resolved_config
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # single-file checkpoints: made atomic (FSDP2 is)
            strategy.checkpoint_io = AtomicCheckpointIO()
        if os.environ.get("MOXIN_METRICS_FILE"):  # a sweep trial: the sweep reads the metrics from this file
            from moxin_lightning.sweep.metrics_file import MetricsFile

            self.trainer.callbacks.append(MetricsFile(os.environ["MOXIN_METRICS_FILE"]))

    def before_fit(self) -> None:
        self._attach_config()

    def before_validate(self) -> None:
        self._attach_config()

    def before_test(self) -> None:
        self._attach_config()


def run_lightning(argv: list[str] | None = None) -> None:
    """Run a LightningCLI command (`argv`, default the process's arguments); our one-line errors are printed as
    such, with no traceback (MOXIN_TRACEBACK=1 shows it)."""
    try:
        MoxinCLI(args=argv)
    except _USER_ERRORS as error:
        exit_with(_root_cause(error))


def _root_cause(error: BaseException) -> BaseException:
    """jsonargparse re-raises a class's __init__ error as its own "does not validate" error: report the original."""
    while error.__cause__ is not None and isinstance(error.__cause__, _USER_ERRORS):
        error = error.__cause__
    return error
