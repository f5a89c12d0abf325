"""MTAN: task-specific soft-attention modules over a shared CNN's feature maps (Liu et al., 2019)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mtl.architectures.base import MultiTaskBackbone

_POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)


def _split_block(block: nn.Module) -> tuple[nn.Module, Optional[nn.Module]]:
    """``(features, pooling)``: a trailing pooling layer of a ``Sequential`` block is split off."""
    if isinstance(block, nn.Sequential) and len(block) > 1 and isinstance(block[-1], _POOLING):
        return nn.Sequential(*list(block)[:-1]), block[-1]
    return block, None


def _out_channels(block: nn.Module, index: int) -> int:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(
            f"MTAN: `backbone.blocks[{index}]` has no Conv2d, so its number of output channels is unknown; "
            "every block must end its convolutions with an nn.Conv2d."
        )
    return convs[-1].out_channels


class _AttentionModule(nn.Module):
    """Task ``k``'s attention at one block: a mask from the shared features (and its previous output)."""

    def __init__(self, in_channels: int, channels: int, previous_channels: Optional[int]) -> None:
        super().__init__()
        # g: [conv1x1, BN, ReLU] then [conv1x1, BN, Sigmoid], as in the paper's Fig. 2.
        self.mask = nn.Sequential(
            nn.Conv2d(in_channels, channels, 1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
            nn.BatchNorm2d(channels),
            nn.Sigmoid(),
        )
        # f: the 3x3 conv that carries the previous block's attended features to this block.
        self.carry: Optional[nn.Module] = None
        if previous_channels is not None:
            self.carry = nn.Sequential(
                nn.Conv2d(previous_channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()
            )

    def forward(self, features: Tensor, previous: Optional[Tensor]) -> Tensor:
        if previous is None or self.carry is None:
            mask_input = features
        else:
            carried = self.carry(previous)
            if carried.shape[-2:] != features.shape[-2:]:
                carried = F.adaptive_max_pool2d(carried, features.shape[-2:])
            mask_input = torch.cat([features, carried], dim=1)
        return self.mask(mask_input) * features


class MTAN(MultiTaskBackbone):
    """Multi-Task Attention Network: per-task soft attention masks on a shared CNN's feature maps.

    Liu, Johns & Davison (2019), "End-to-End Multi-Task Learning with Attention", CVPR. The shared
    network is ``backbone`` (e.g. :class:`~lightning_mtl.architectures.SmallCNN`), read through its
    ``blocks``. At block ``j`` with shared features ``pⱼ`` (before the block's trailing pooling, which
    is the down-sampling between blocks), task ``k``'s attention module computes a mask
    ``aⱼ = g([pⱼ; f(âⱼ₋₁)])`` — ``g`` two 1×1 conv-BN layers ending in a sigmoid, ``f`` a 3×3 conv-BN-ReLU
    on the task's previous attended features, pooled to ``pⱼ``'s size — and the attended features
    ``âⱼ = aⱼ ⊙ pⱼ``. The last attended features go through the block's pooling and then
    ``backbone.head`` (shared; e.g. SmallCNN's flatten-linear) when the backbone has one, else a
    global average pool, giving each task a vector ``(batch, backbone.out_features)`` for its head.

    The paper's shared network has several convolutions per block and takes the mask's input from
    the block's first one; a ``SmallCNN`` block has one, so ``pⱼ`` serves both roles.

    Task-specific parameters (:meth:`task_parameters`) are the task's attention modules, used by that
    task alone; the backbone is shared.

    Args:
        backbone: a CNN exposing ``blocks``, an ``nn.ModuleList`` of stages mapping feature maps to
            feature maps, each containing an ``nn.Conv2d`` (and, optionally, ``head``).
        tasks: task names, the same as the ``MultiTaskModule``'s.
    """

    def __init__(self, backbone: nn.Module, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        blocks = getattr(backbone, "blocks", None)
        if not isinstance(backbone, nn.Module) or not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or not blocks:
            raise TypeError(
                f"MTAN: `backbone` ({type(backbone).__name__}) exposes no feature maps: it needs a `blocks` attribute, "
                "a non-empty nn.ModuleList of conv stages (like lightning_mtl.architectures.SmallCNN), whose outputs "
                "the attention modules read."
            )
        self.backbone = backbone
        # (features, pooling) views of each block, not registered again (the backbone holds them).
        self._stages = [_split_block(block) for block in blocks]
        channels = [_out_channels(block, i) for i, block in enumerate(blocks)]
        self.out_features = getattr(backbone, "out_features", channels[-1])
        self.attention = nn.ModuleDict(
            {
                task: nn.ModuleList(
                    _AttentionModule(
                        channels[j] if j == 0 else 2 * channels[j], channels[j], None if j == 0 else channels[j - 1]
                    )
                    for j in range(len(channels))
                )
                for task in self.tasks
            }
        )

    def task_modules(self) -> Mapping[str, nn.Module]:
        return dict(self.attention.items())

    def _head(self, maps: Tensor) -> Tensor:
        head = getattr(self.backbone, "head", None)
        if head is None:
            return maps.mean(dim=(-2, -1))
        return head(maps)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        check = getattr(self.backbone, "input_size", None)
        if check is not None and tuple(x.shape[-2:]) != tuple(check):
            raise ValueError(
                f"MTAN: the backbone was built for inputs of size {tuple(check)}, got {tuple(x.shape[-2:])}."
            )
        attended: dict[str, Optional[Tensor]] = {task: None for task in self.tasks}
        shared = x
        for j, (features_layer, pooling) in enumerate(self._stages):
            features = features_layer(shared)
            for task in self.tasks:
                attended[task] = self.attention[task][j](features, attended[task])
            shared = pooling(features) if pooling is not None else features
            if pooling is not None:
                attended = {task: pooling(value) for task, value in attended.items()}  # type: ignore[arg-type]
        return {task: self._head(value) for task, value in attended.items()}  # type: ignore[arg-type]
