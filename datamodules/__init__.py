"""LightningDataModules of the recipe (pretraining shards; chat, preference pairs and prompts to come).

A top-level package, shipped beside `moxin_lightning`; it may import `moxin_lightning`, never the reverse.
"""

from datamodules.chat import ChatData
from datamodules.preference import PreferenceData
from datamodules.pretrain import PretrainData

__all__ = ["ChatData", "PreferenceData", "PretrainData"]
