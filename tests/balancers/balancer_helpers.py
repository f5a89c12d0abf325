"""Shared builders for the balancer tests."""

from __future__ import annotations

import torch

from lightning_mtl.balancers import (
    DBMTL, MGDA, AlignedMTL, Balancer, ConFIG, DualProj, GradDrop, GradNorm, GradVac, IMTLG, PCGrad, UPGrad,
)  # fmt: skip

# Every gradient-level method that runs without cvxpy (CAGrad and NashMTL need it).
GRADIENT_METHODS = [MGDA, PCGrad, GradVac, IMTLG, AlignedMTL, UPGrad, DualProj, ConFIG, GradNorm, GradDrop, DBMTL]


def direction(balancer: Balancer, G: torch.Tensor) -> torch.Tensor:
    """The plain callable on a task-gradient matrix (GradNorm also needs the losses)."""
    if isinstance(balancer, GradNorm):
        return balancer(G, torch.ones(G.shape[0]))
    return balancer(G)


def ready(cls, names=("a", "b", "c")) -> Balancer:
    balancer = cls()
    balancer.setup(list(names))
    return balancer
