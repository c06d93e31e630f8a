"""Checks of a `fit` that need the built task and datamodule, run before any logger, model or process group
starts (`MoxinCLI.before_fit`): a wrong schedule or dataset must not leave a W&B run folder, a model summary
or half a first-use build behind it.

- The datamodule's data against the model, when the datamodule offers `check_before_start(model_config)`
  (PretrainData, ChatData, PreferenceData, PromptData): first-use builds, manifests, tokenizers, lengths.
- Then the task's optimizer and schedule settings against the run's length, when `max_steps` gives it
  (`TrainingTask.check_schedule`; an epoch-bounded run's length needs the data, so `configure_optimizers`
  checks it again).
- A validation interval longer than the whole run: Lightning refuses it when the fit starts; a shorter run (for
  instance the README's job with `--trainer.max_steps=20`) validates at its end instead, and says so.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


def check_before_start(trainer: L.Trainer, task: Any, datamodule: Any) -> None:
    """Run the checks above; raises the components' own one-line errors."""
    fit_validation_to_run(trainer)
    if datamodule is not None and hasattr(datamodule, "check_before_start"):
        datamodule.check_before_start(getattr(task, "model_config", None))
    total_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
    if total_steps is not None and hasattr(task, "check_schedule"):
        task.check_schedule(total_steps)


def fit_validation_to_run(trainer: L.Trainer) -> None:
    """Validate at the last batch of a run shorter than an integer `val_check_interval` (counted in batches)."""
    interval = trainer.val_check_interval
    if not isinstance(interval, int) or not trainer.max_steps or trainer.max_steps < 1:
        return
    batches = trainer.max_steps * trainer.accumulate_grad_batches
    if interval > batches:
        trainer.val_check_interval = batches
        rank_zero_info(
            f"fit: val_check_interval={interval} is longer than this run's {batches} batches "
            f"(max_steps={trainer.max_steps}); validating at its end instead"
        )
