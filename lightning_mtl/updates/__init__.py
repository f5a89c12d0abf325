"""Balancing paths: the one way per configuration in which a training step's task losses become its update.

======================================  =====================================================
balancer needs / ``gradients``          path
======================================  =====================================================
losses (Static, UW, DWA, FAMO, ...)     :class:`LossLevelPath`
gradients or Gramian / ``parameters``   :class:`ParameterJacobianPath`
gradients or Gramian / ``representation``  :class:`RepresentationPath`
======================================  =====================================================

``MultiTaskModule`` picks the path once, when it is built, and calls it once per step; see
``docs/architecture.md`` for the data flow of one step.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_mtl.balancers import Balancer
from lightning_mtl.gradients import GradientMode
from lightning_mtl.nonfinite import NonfiniteCheck
from lightning_mtl.updates.base import BalancingPath, ParameterLists, Tap
from lightning_mtl.updates.loss_level import LossLevelPath
from lightning_mtl.updates.parameters import ParameterJacobianPath
from lightning_mtl.updates.representation import RepresentationPath

__all__ = ["BalancingPath", "LossLevelPath", "ParameterJacobianPath", "RepresentationPath", "Tap", "balancing_path"]


def balancing_path(
    balancer: Balancer,
    gradients: GradientMode,
    task_names: Sequence[str],
    nonfinite: NonfiniteCheck,
    parameter_lists: ParameterLists,
) -> BalancingPath:
    """The path for ``balancer`` (by what it :attr:`~lightning_mtl.balancers.Balancer.needs`) and ``gradients``."""
    if balancer.needs == "losses":
        return LossLevelPath(balancer, task_names, nonfinite, parameter_lists, gradients=gradients)
    path = ParameterJacobianPath if gradients == "parameters" else RepresentationPath
    return path(balancer, task_names, nonfinite, parameter_lists)
