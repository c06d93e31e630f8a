"""The LightningModules: one backbone, one base (`base.TrainingTask`), one file per objective."""

from moxin_lightning.tasks.base import TrainingTask
from moxin_lightning.tasks.dpo import DPO
from moxin_lightning.tasks.grpo import GRPO
from moxin_lightning.tasks.pretrain import Pretrain
from moxin_lightning.tasks.sft import SFT

__all__ = ["DPO", "GRPO", "SFT", "Pretrain", "TrainingTask"]
