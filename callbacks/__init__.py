"""Lightning callbacks of the recipe (context extension, checkpoint promotion, ...).

A top-level package, shipped beside `moxin_lightning`; it may import `moxin_lightning`, never the reverse.
"""
