"""Data preparation: documents from files, object stores or the built-in corpus -> litdata token shards.

`moxin_lightning.data.prepare.prepare` writes a dataset folder (train/, val/, manifest.json); `read_manifest`
describes one. The function is not re-exported here, so `moxin_lightning.data.prepare` stays the module.
Importing this package is cheap: litdata and torch load only when shards are written.
"""

from moxin_lightning.data.manifest import read as read_manifest
from moxin_lightning.data.prepare import PrepareError
from moxin_lightning.data.sources import DataError
from moxin_lightning.data.worker import is_validation

__all__ = ["DataError", "PrepareError", "is_validation", "read_manifest"]
