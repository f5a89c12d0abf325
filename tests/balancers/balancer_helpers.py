"""Shared builders for the balancer tests."""

from __future__ import annotations

import importlib.util
import itertools
import math

import numpy as np
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


def simplex_oracle(Q: np.ndarray) -> np.ndarray:
    """``argmin_{w ∈ Δ} wᵀ Q w`` by enumerating supports: the affine-hull minimiser of each (bordered system)."""
    K = Q.shape[0]
    best, best_value = None, math.inf
    for r in range(1, K + 1):
        for support in itertools.combinations(range(K), r):
            S = list(support)
            block = Q[np.ix_(S, S)]
            border = block.diagonal().mean()  # the border scaled like the block: the system stays balanced
            system = np.zeros((r + 1, r + 1))
            system[:r, :r], system[:r, r], system[r, :r] = block, border, border
            rhs = np.zeros(r + 1)
            rhs[r] = border
            try:
                y = np.linalg.solve(system, rhs)[:r]
            except np.linalg.LinAlgError:
                y = np.linalg.lstsq(system, rhs, rcond=None)[0][:r]
            if y.min() < -1e-12 or abs(y.sum() - 1.0) > 1e-9:
                continue
            w = np.zeros(K)
            w[S] = np.clip(y, 0.0, None) / np.clip(y, 0.0, None).sum()
            value = w @ Q @ w
            if value < best_value:
                best, best_value = w, value
    return best
