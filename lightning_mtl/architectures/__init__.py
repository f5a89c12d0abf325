"""Shared backbones and multi-task architectures."""

from lightning_mtl.architectures.cnn import SmallCNN
from lightning_mtl.architectures.mlp import MLP

__all__ = ["MLP", "SmallCNN"]
