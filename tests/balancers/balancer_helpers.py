"""Shared builders for the balancer tests."""

from __future__ import annotations

import importlib.util

import torch

from lightning_mtl.balancers import (
    DBMTL, MGDA, AlignedMTL, Balancer, CAGrad, ConFIG, DualProj, GradDrop, GradNorm, GradVac, IMTLG, NashMTL,
    PCGrad, UPGrad,
)  # fmt: skip

#: Whether the optional solvers (``lightning-mtl[solvers]``, part of the ``dev`` extra) are installed.
HAS_SOLVERS = importlib.util.find_spec("cvxpy") is not None
# Every gradient-level method (CAGrad and NashMTL only with cvxpy).
GRADIENT_METHODS = [MGDA, PCGrad, GradVac, IMTLG, AlignedMTL, UPGrad, DualProj, ConFIG, GradNorm, GradDrop, DBMTL]
if HAS_SOLVERS:
    GRADIENT_METHODS += [CAGrad, NashMTL]


def direction(balancer: Balancer, G: torch.Tensor) -> torch.Tensor:
    """The plain callable on a task-gradient matrix (GradNorm also needs the losses)."""
    if isinstance(balancer, GradNorm):
        return balancer(G, torch.ones(G.shape[0]))
    return balancer(G)


def ready(cls, names=("a", "b", "c")) -> Balancer:
    balancer = cls()
    balancer.setup(list(names))
    return balancer
