"""Callbacks: diagnostics and training-schedule switches for multi-task models."""

from lightning_mtl.callbacks.gate_statistics import GateStatistics
from lightning_mtl.callbacks.sequential_transfer import SequentialTransfer

__all__ = ["GateStatistics", "SequentialTransfer"]
