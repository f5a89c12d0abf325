"""lightning-mtl: multi-task learning for PyTorch Lightning."""

from lightning_mtl.data import MultiTaskDataModule
from lightning_mtl.module import MultiTaskModule
from lightning_mtl.runs import load_run
from lightning_mtl.step import StepView
from lightning_mtl.task import Task

__all__ = ["MultiTaskDataModule", "MultiTaskModule", "StepView", "Task", "load_run"]
__version__ = "0.1.0"
