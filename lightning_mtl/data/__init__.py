"""Multi-task data: the data module, its loader and the step sampler."""

from lightning_mtl.data.datamodule import MultiTaskDataModule
from lightning_mtl.data.loader import MultiTaskLoader, SharedInputLoader
from lightning_mtl.data.sampler import SAMPLING_MODES, MultiTaskSampler

__all__ = ["SAMPLING_MODES", "MultiTaskDataModule", "MultiTaskLoader", "MultiTaskSampler", "SharedInputLoader"]
