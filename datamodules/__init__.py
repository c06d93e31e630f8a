"""LightningDataModules of the recipe (pretraining shards; chat, preference pairs and prompts).

A top-level package, shipped beside `moxin_lightning`; it may import `moxin_lightning`, never the reverse.
"""

from datamodules.chat import ChatData
from datamodules.preference import PreferenceData
from datamodules.pretrain import PretrainData
from datamodules.prompts import PromptData

__all__ = ["ChatData", "PreferenceData", "PretrainData", "PromptData"]
