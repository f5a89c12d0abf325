"""GLS: the geometric loss strategy (Chennupati et al., 2019)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchjd.scalarization import GeometricMean

from lightning_mtl.balancers._utils import all_present
from lightning_mtl.balancers.base import NonlinearScalarization


class GLS(NonlinearScalarization):
    """Geometric loss strategy, from `MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss
    Strategy for Multi-Task Learning <https://arxiv.org/abs/1904.08492>`_ (Chennupati et al., CVPRW 2019).

    The loss is the geometric mean of the present tasks' losses, ``(Π_k L_k)^{1/K'}``, whose
    gradient weighs each task by ``GLS / (K' L_k)``: a task's weight falls as its loss grows, which
    makes the method invariant to each loss's scale. Wraps ``torchjd.scalarization.GeometricMean``
    (applied as is when every task is present; otherwise with absent losses set to 1 and raised to
    ``K/K'``, which keeps the shape fixed). Losses of present tasks must be strictly positive.
    Under DDP every process weighs its losses by the weights at the global batch's losses (see
    :class:`~lightning_mtl.balancers.base.NonlinearScalarization`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.geometric_mean = GeometricMean()

    def _scalarize(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        # torchjd's geometric mean, with its graph: the model's gradient comes from torchjd's own math.
        # The effective weights ∂GLS/∂L_k = GLS / (K' L_k), returned for logging, are taken in closed
        # form (a separate autograd.grad would cost more than the rest of the method on a small model;
        # the tests check them against autograd).
        detached = losses.detach()
        if all_present(present):
            value = self.geometric_mean(losses)
            return value, value.detach() / (losses.numel() * detached)
        count = present.sum()
        value = self.geometric_mean(torch.where(present, losses, 1.0)) ** (losses.numel() / count.clamp_min(1))
        value = torch.where(count > 0, value, 0.0)  # K / K' above; no task at all: a zero loss
        return value, torch.where(present, value.detach() / (count * detached), 0.0)
