"""Callbacks: diagnostics and training-schedule switches for multi-task models."""

from lightning_mtl.callbacks.delta_m import DeltaM
from lightning_mtl.callbacks.gate_statistics import GateStatistics
from lightning_mtl.callbacks.gradient_conflict import GradientConflict
from lightning_mtl.callbacks.model_summary import MultiTaskModelSummary
from lightning_mtl.callbacks.prediction_writer import TaskPredictionWriter
from lightning_mtl.callbacks.sequential_transfer import SequentialTransfer
from lightning_mtl.callbacks.step_timer import StepTimer
from lightning_mtl.callbacks.task_affinity import TaskAffinity
from lightning_mtl.callbacks.task_table import TaskTable
from lightning_mtl.callbacks.task_weights import TaskWeights

__all__ = ["DeltaM", "GateStatistics", "GradientConflict", "MultiTaskModelSummary", "SequentialTransfer", "StepTimer", "TaskAffinity", "TaskPredictionWriter", "TaskTable", "TaskWeights"]
