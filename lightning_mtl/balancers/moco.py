"""MoCo: stochastic multi-objective gradient correction (Fernando et al., 2023)."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_mtl.balancers._utils import at_least_float32, check_range, loaded_copy
from lightning_mtl.balancers.base import GradientBalancer, check_gradient_matrix, nonzero_rows
from lightning_mtl.balancers.sdmgrad import project_simplex
from lightning_mtl.gradients import row_products


class MoCo(GradientBalancer):
    """Multi-objective gradient correction, from `Mitigating Gradient Bias in Multi-objective Learning: A
    Provably Convergent Approach <https://openreview.net/forum?id=dLAYGdKTi2>`_ (Fernando et al., ICLR
    2023), Algorithm 1.

    MGDA's weights are a nonlinear function of the gradients, so MGDA on stochastic gradients is biased.
    MoCo replaces the step's gradients ``G`` by tracked gradients ``Y`` (K × P), a moving average
    ``Y ← Y − β (Y − G)``, and moves the simplex weights ``λ`` by one projected-gradient step on MGDA's
    objective at ``Y`` (regularised by ``ρ``), ``λ ← Π_Δ(λ − γ (Y Yᵀ + ρ I) λ)``; the direction is
    ``Yᵀλ``. With ``beta_decay`` / ``gamma_decay`` ``σ > 0`` the steps decrease as ``β_t = β t^{−σ}``,
    ``γ_t = γ t^{−σ}`` (``t`` = 1, 2, ... counts the calls), as in the paper's analysis; 0 keeps them
    constant. ``γ`` acts on the Gramian of the tracked gradients as it is (not normalised): scale it to
    the squared gradient norms of the problem.

    The direction is built from the tracked gradients, not from this step's ``G`` alone, so it is not a
    Gramian weighting (``needs = "gradients"``). ``Y`` starts at 0 and ``λ`` uniform, and start so again, with
    ``t`` back at 1, when ``G`` changes shape (another K or P: a new problem). The state
    (``Y``, ``λ``, the call count) is extra state, so it is in the checkpoint; ``Y`` follows the module's
    ``.to()``. A step without some tasks (zero rows of ``G``) runs MoCo on the present ones: their ``Y``
    rows are updated, the others kept exactly, and their part of ``λ``, renormalised to sum to 1, takes
    the step and is written back at the same total. Under DDP the module hands every rank the global
    batch's gradients (the all-reduced Jacobian), so every rank keeps the same state. There is no
    representation-mode form: the tracked rows would average representation gradients of different
    samples (``supports_representation = False``; the module refuses it with that reason).

    Args:
        beta: tracking rate ``β ∈ (0, 1]`` (1: ``Y`` is this step's gradients, MoCo is one step of
            projected-gradient MGDA).
        gamma: step ``γ > 0`` of the weights' projected-gradient update.
        rho: regularisation ``ρ ≥ 0`` of the weights' objective.
        beta_decay: exponent ``σ ≥ 0`` of ``β_t = β t^{−σ}``.
        gamma_decay: exponent ``σ ≥ 0`` of ``γ_t = γ t^{−σ}``.
    """

    supports_representation: ClassVar[bool] = False

    fresh_direction: ClassVar[bool] = True  # forward returns a new tensor in every branch

    def __init__(
        self, beta: float = 0.5, gamma: float = 0.1, rho: float = 0.0, beta_decay: float = 0.0, gamma_decay: float = 0.0
    ) -> None:
        super().__init__()
        self.beta = check_range("beta", beta, 0.0, 1.0, open_low=True)
        self.gamma = check_range("gamma", gamma, 0.0, open_low=True)
        self.rho = check_range("rho", rho, 0.0)
        self.beta_decay = check_range("beta_decay", beta_decay, 0.0)
        self.gamma_decay = check_range("gamma_decay", gamma_decay, 0.0)
        self.tracked: Optional[Tensor] = None  # Y, K x P
        self.simplex_weights: Optional[Tensor] = None  # λ, float64, on CPU
        self.steps = 0

    def forward(self, G: Tensor) -> Tensor:  # type: ignore[override]
        check_gradient_matrix(G)
        work = at_least_float32(G.detach())
        k = work.shape[0]
        if self.tracked is None or self.tracked.shape != work.shape:  # a new problem: start afresh (t too)
            self.tracked = torch.zeros_like(work)
            self.simplex_weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
            self.steps = 0
        elif self.tracked.dtype != work.dtype or self.tracked.device != work.device:
            self.tracked = self.tracked.to(work)
        present = nonzero_rows(work)
        index = present.nonzero().squeeze(1).cpu()  # the step's one host synchronisation (with the Gramian below)
        if index.numel() == 0:
            return torch.zeros_like(G[0])
        self.steps += 1
        beta = self.beta * self.steps ** (-self.beta_decay)
        gamma = self.gamma * self.steps ** (-self.gamma_decay)
        if index.numel() == k:
            self.tracked.lerp_(work, beta)  # Y ← Y − β (Y − G)
            rows = self.tracked
        else:
            on_device = index.to(work.device)
            self.tracked[on_device] = self.tracked[on_device].lerp(work[on_device], beta)
            rows = self.tracked[on_device]
        gramian = row_products(rows).cpu().double().numpy()
        weights = self.simplex_weights.to("cpu", torch.float64).numpy().copy()
        block = weights[index.numpy()]
        mass = float(block.sum())
        lam = block / mass if mass > 0 else np.full(block.size, 1.0 / block.size)
        lam = project_simplex(lam - gamma * (gramian @ lam + self.rho * lam))
        if mass > 0:
            weights[index.numpy()] = lam * mass
        self.simplex_weights = torch.from_numpy(weights)
        return (torch.from_numpy(lam).to(rows) @ rows).to(G.dtype)

    def reset(self) -> None:
        self.tracked = self.simplex_weights = None
        self.steps = 0

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> MoCo:
        super()._apply(fn, recurse)
        if self.tracked is not None:  # extra state: moved and cast like a buffer
            self.tracked = fn(self.tracked)
        return self

    def get_extra_state(self) -> dict[str, Any]:
        return {"tracked": self.tracked, "simplex_weights": self.simplex_weights, "steps": self.steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.tracked = loaded_copy(state["tracked"])
        self.simplex_weights = loaded_copy(state["simplex_weights"])
        self.steps = int(state["steps"])
