"""moxin_lightning: the Moxin-7B recipe (pretraining, SFT, DPO, GRPO) on PyTorch Lightning."""

__version__ = "0.1.0"
