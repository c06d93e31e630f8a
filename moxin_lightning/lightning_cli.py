"""`MoxinCLI`: the `fit` / `validate` / `test` commands, a LightningCLI over our tasks and datamodules.

The task (`model:`) and the datamodule (`data:`) are chosen in YAML by `class_path`, so any subclass of
`tasks.TrainingTask` or `LightningDataModule` plugs in without code here. Configs use the `omegaconf+`
parser mode: several `--config` files merge key by key, then `${...}` interpolations resolve.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ActionYesNo, set_parsing_settings
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from moxin_lightning.callbacks.promotion import CheckpointPromotion
from moxin_lightning.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
from moxin_lightning.config_checks import check_batch_sizes, check_config_files
from moxin_lightning.errors import USER_ERRORS, exit_with
from moxin_lightning.preemption import EXIT_PREEMPTED, SaveOnPreemption
from moxin_lightning.preflight import check_before_start
from moxin_lightning.resume import ApplyResumeSettings
from moxin_lightning.run_folder import RunFolder, check_length, check_rerun, is_first_process
from moxin_lightning.tasks.base import TrainingTask

# our one-line input errors, plus Lightning's own config checks (same one-line style)
_USER_ERRORS = (*USER_ERRORS, MisconfigurationException, CheckpointWriteError)
_HELD_FOLDERS: list[RunFolder] = []  # run-folder locks of this process, released when its command ends


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

    def add_arguments_to_parser(self, parser: Any) -> None:
        """The run-folder flags (`moxin_lightning.run_folder`); validate and test accept and ignore them, so one
        command line serves all three."""
        parser.add_argument(
            "--overwrite",
            action=ActionYesNo,
            default=False,
            help="fit: delete the checkpoints and release an earlier run left in this run's folders, then start",
        )
        parser.add_argument(
            "--allow_infinite",
            action=ActionYesNo,
            default=False,
            help="fit: allow a run with no max_steps, max_epochs or max_time (it trains until stopped)",
        )

    def _parse_ckpt_path(self) -> None:
        """LightningCLI would replace the config's `model:` settings with those saved in `--ckpt_path`, dropping a
        new lr or model size without a word; a resume takes the config (`moxin_lightning.resume` says what may
        change and refuses the rest)."""

    def before_instantiate_classes(self) -> None:
        """Keep the merged, resolved config as text: releases (CheckpointPromotion) ship it."""
        subcommand = self.subcommand
        config = self.config[subcommand] if subcommand else self.config
        self.resolved_config = self._parser(subcommand).dump(config, skip_none=False)  # as --print_config
        check_batch_sizes(config)  # any datamodule's, before it is built
        if subcommand == "fit":  # before any work: an endless run is refused before the data or the model load
            trainer = config["trainer"]
            check_length(trainer["max_steps"], trainer["max_epochs"], trainer["max_time"], config["allow_infinite"])

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
        self.trainer.callbacks += [ApplyResumeSettings(self.config["fit"]["ckpt_path"]), SaveOnPreemption()]
        check_before_start(self.trainer, self.model, self.datamodule)  # before any logger or model starts
        self._claim_run_folder()

    def after_fit(self) -> None:
        release_run_folders()

    def _claim_run_folder(self) -> None:
        """Lock `trainer.default_root_dir` (when the config sets one) before any logger or model starts, and refuse
        a new run over an earlier run's checkpoints or release (`moxin_lightning.run_folder`)."""
        config = self.config["fit"]
        root = config["trainer"]["default_root_dir"]
        if not root or "://" in str(root) or not is_first_process():
            return
        folder = RunFolder(root)
        folder.acquire()
        _HELD_FOLDERS.append(folder)
        checkpoint_dirs = [Path(c.dirpath) for c in self.trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
        releases = [Path(c.dirpath) for c in self.trainer.callbacks if isinstance(c, CheckpointPromotion)]
        check_rerun(checkpoint_dirs, releases, resuming=bool(config["ckpt_path"]), overwrite=config["overwrite"])

    def before_validate(self) -> None:
        self._attach_config()

    def before_test(self) -> None:
        self._attach_config()


def run_lightning(argv: list[str] | None = None) -> None:
    """Run a LightningCLI command (`argv`, default the process's arguments); our one-line errors are printed as
    such, with no traceback (MOXIN_TRACEBACK=1 shows it)."""
    try:
        check_config_files(sys.argv[1:] if argv is None else list(argv))  # which file and line, before parsing
        MoxinCLI(args=argv)
    except _USER_ERRORS as error:
        exit_with(_root_cause(error))
    except SIGTERMException:  # SaveOnPreemption saved last.ckpt and said where; non-zero, so a scheduler requeues
        sys.exit(EXIT_PREEMPTED)
    finally:
        release_run_folders()


def release_run_folders() -> None:
    """Release the run-folder locks this process holds (the OS would at exit; tests run several commands)."""
    while _HELD_FOLDERS:
        _HELD_FOLDERS.pop().release()


def _root_cause(error: BaseException) -> BaseException:
    """jsonargparse re-raises a class's __init__ error as its own "does not validate" error: report the original."""
    while error.__cause__ is not None and isinstance(error.__cause__, _USER_ERRORS):
        error = error.__cause__
    return error
