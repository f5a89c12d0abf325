"""Bundled multi-task datasets that need no download."""

from lightning_mtl.datasets.multidigits import MultiDigits, MultiDigitsTask, multidigits_per_task
from lightning_mtl.datasets.multidigits_datamodule import MultiDigitsDataModule
from lightning_mtl.datasets.synthetic_mmoe import SyntheticMMoE

__all__ = ["MultiDigits", "MultiDigitsDataModule", "MultiDigitsTask", "SyntheticMMoE", "multidigits_per_task"]
