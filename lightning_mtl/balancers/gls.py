"""GLS: the geometric loss strategy (Chennupati et al., 2019)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchjd.scalarization import GeometricMean

from lightning_mtl.balancers._utils import scalarize
from lightning_mtl.balancers.base import Balancer


class GLS(Balancer):
    """Geometric loss strategy, from `MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss
    Strategy for Multi-Task Learning <https://arxiv.org/abs/1904.08492>`_ (Chennupati et al., CVPRW 2019).

    The loss is the geometric mean of the present tasks' losses, ``(Π_k L_k)^{1/K'}``, whose
    gradient weighs each task by ``GLS / (K' L_k)``: a task's weight falls as its loss grows, which
    makes the method invariant to each loss's scale. Wraps ``torchjd.scalarization.GeometricMean``
    (applied with absent losses set to 1 and raised to ``K/K'``, which keeps the shape fixed). Losses
    of present tasks must be strictly positive.
    """

    def __init__(self) -> None:
        super().__init__()
        self.geometric_mean = GeometricMean()

    def forward(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        count = present.sum()
        exponent = losses.numel() / count.clamp_min(1)  # K / K'

        def objective(values: Tensor) -> Tensor:
            mean = self.geometric_mean(torch.where(present, values, 1.0)) ** exponent
            return torch.where(count > 0, mean, 0.0)

        return scalarize(objective, losses, parameters=False)
