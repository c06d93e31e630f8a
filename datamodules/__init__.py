"""LightningDataModules of the recipe (pretraining shards; chat, preference pairs and prompts).

A top-level package, shipped beside `moxin_lightning`; it may import `moxin_lightning`, never the reverse.
"""

from moxin_lightning.datamodules.chat import ChatData
from moxin_lightning.datamodules.preference import PreferenceData
from moxin_lightning.datamodules.pretrain import PretrainData
from moxin_lightning.datamodules.prompts import PromptData

__all__ = ["ChatData", "PreferenceData", "PretrainData", "PromptData"]
