"""Shared backbones and multi-task architectures."""

from lightning_mtl.architectures.cnn import SmallCNN
from lightning_mtl.architectures.heads import RegressionHead
from lightning_mtl.architectures.mlp import MLP

__all__ = ["MLP", "RegressionHead", "SmallCNN"]
