"""LightningDataModules of the recipe (pretraining shards, chat, preference pairs, prompts).

A top-level package, shipped beside `moxin_lightning`; it may import `moxin_lightning`, never the reverse.
"""
