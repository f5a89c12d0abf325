"""Bundled multi-task datasets that need no download."""

from lightning_mtl.datasets.multidigits import (
    MultiDigits,
    MultiDigitsDataModule,
    multidigits_per_task,
)

__all__ = ["MultiDigits", "MultiDigitsDataModule", "multidigits_per_task"]
