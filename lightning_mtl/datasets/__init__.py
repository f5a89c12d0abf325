"""Bundled multi-task datasets that need no download."""

from lightning_mtl.datasets.multidigits import (
    MultiDigits,
    MultiDigitsDataModule,
    multidigits_per_task,
)
from lightning_mtl.datasets.synthetic_mmoe import SyntheticMMoE

__all__ = ["MultiDigits", "MultiDigitsDataModule", "SyntheticMMoE", "multidigits_per_task"]
