"""Lightning callbacks of the recipe: context extension, GRPO's response-length curriculum, checkpoint promotion,
training speed, progress, loss spikes.

A top-level package, shipped beside `moxin_lightning`; it may import `moxin_lightning`, never the reverse.
Configs name them by class path, e.g. `class_path: moxin_lightning.callbacks.ContextExtension`.
"""

from moxin_lightning.callbacks.context_extension import ContextExtension, Phase
from moxin_lightning.callbacks.in_loop_eval import InLoopEvaluation
from moxin_lightning.callbacks.loss_spikes import LossSpikes
from moxin_lightning.callbacks.progress import StepProgressBar
from moxin_lightning.callbacks.promotion import CheckpointPromotion
from moxin_lightning.callbacks.response_length import ResponseLengthCurriculum
from moxin_lightning.callbacks.throughput import TrainingSpeed
from moxin_lightning.sweep.metrics_file import MetricsFile  # lives with the sweep that reads it

__all__ = [
    "CheckpointPromotion",
    "ContextExtension",
    "InLoopEvaluation",
    "LossSpikes",
    "MetricsFile",
    "Phase",
    "ResponseLengthCurriculum",
    "StepProgressBar",
    "TrainingSpeed",
]
