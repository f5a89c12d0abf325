"""Shared backbones and multi-task architectures.

A plain backbone returning one tensor (``MLP``, ``SmallCNN``, ``RNNEncoder``, any ``nn.Module``) is
hard parameter sharing; the multi-task architectures return ``{task: tensor}``, one input per head.
"""

from lightning_mtl.architectures.base import MultiTaskBackbone, parameter_counts
from lightning_mtl.architectures.cnn import SmallCNN
from lightning_mtl.architectures.cross_stitch import CrossStitch
from lightning_mtl.architectures.dselect_k import DSelectK
from lightning_mtl.architectures.heads import RegressionHead
from lightning_mtl.architectures.mlp import MLP
from lightning_mtl.architectures.mmoe import MMoE, OMoE
from lightning_mtl.architectures.mtan import MTAN
from lightning_mtl.architectures.ple import CGC, PLE
from lightning_mtl.architectures.rnn import RNNEncoder
from lightning_mtl.architectures.soft_sharing import SoftSharing

__all__ = [
    "CGC",
    "MLP",
    "MTAN",
    "PLE",
    "CrossStitch",
    "DSelectK",
    "MMoE",
    "MultiTaskBackbone",
    "OMoE",
    "RNNEncoder",
    "RegressionHead",
    "SmallCNN",
    "SoftSharing",
    "parameter_counts",
]
