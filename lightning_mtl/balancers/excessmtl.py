"""ExcessMTL: robust multi-task learning with excess risks (He et al., 2024)."""

from __future__ import annotations

import numbers
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import Tensor

from lightning_mtl.balancers._utils import at_least_float32, check_range, loaded_copy, masked_softmax
from lightning_mtl.balancers.base import GradientBalancer, check_gradient_matrix


class ExcessMTL(GradientBalancer):
    """Multi-task learning with excess risks, from `Robust Multi-Task Learning with Excess Risks
    <https://arxiv.org/abs/2402.02009>`_ (He et al., ICML 2024), Algorithm 1.

    Loss-based weightings give the most weight to the tasks with the largest losses, which under label
    noise are the noisiest (their Bayes error is large), not the least trained. ExcessMTL weighs the tasks
    by their *excess risk* ``L_k(θ) − L_k(θ_k*)``, their distance to convergence, estimated from the
    gradient by a second-order Taylor expansion around the minimiser, ``½ g_kᵀ H_k⁻¹ g_k``, with a
    diagonal, AdaGrad-like approximation of the Hessian from the accumulated squared gradients:
    ``S_k ← S_k + g_k ⊙ g_k`` and ``e_k = g_kᵀ diag(√S_k + ε)⁻¹ g_k`` (the ½ cancels in the
    normalisation). To make the tasks comparable each estimate is divided by its task's baseline, the
    estimate at its first step (or its mean over ``warmup_steps`` steps), and the weights ``α`` (on the
    simplex, starting uniform) take an exponentiated-gradient ascent step on the normalised excess risks,
    ``α_k ← α_k exp(η e_k / e_k⁰) / Σ_j α_j exp(η e_j / e_j⁰)``; the direction is ``Σ_k α_k g_k``,
    i.e. the loss ``Σ_k α_k L_k``. During the ``warmup_steps`` first steps the weights stay uniform while
    the baselines are collected.

    The excess-risk estimate needs the gradients themselves (their squares), so this is not a Gramian
    weighting (``needs = "gradients"``); the weights are updated before the step's direction is formed.
    A ``G`` of another shape (another K or P: a new problem) starts the state afresh, warm-up included.
    The state (``S``, K × P; ``log α``, kept in log space so that a long-neglected task's weight stays
    positive; the baselines; the step count) is extra state, so it is in the
    checkpoint; ``S`` follows the module's ``.to()``. A task absent from a step (zero row) keeps its
    accumulator, baseline and weight exactly; the present tasks' weights take the step within their total
    and are renormalised to sum to 1 for the direction. Under DDP the module hands every rank the global
    batch's gradients (the all-reduced Jacobian), so every rank keeps the same state; no loss value
    enters the state. There is no representation-mode form: ``S`` would accumulate representation
    gradients of different samples (``supports_representation = False``; the module refuses it).

    Args:
        lr: step size ``η_α > 0`` of the weights' exponentiated-gradient update. The paper tunes it; the
            default 0.1 is ours: with 1, on MultiDigits (3 tasks, Adam, batch 32), the weights went to one
            task within 15 steps (with a 20-step warm-up too) and the other tasks did not learn in an
            epoch; with 0.1 they stayed between 0.27 and 0.42 (read every 15 steps) and every task learned.
        warmup_steps: steps during which the weights stay uniform and each task's baseline is the mean
            of its estimates (0: the first step's estimate).
        eps: added to ``√S`` in the diagonal Hessian approximation.
    """

    supports_representation: ClassVar[bool] = False

    fresh_direction: ClassVar[bool] = True  # forward returns a new tensor in every branch

    def __init__(self, lr: float = 0.1, warmup_steps: int = 0, eps: float = 1e-8) -> None:
        super().__init__()
        self.lr = check_range("lr", lr, 0.0, open_low=True)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
        self.warmup_steps = int(warmup_steps)
        self.eps = check_range("eps", eps, 0.0, open_low=True)
        self.second_moments: Optional[Tensor] = None  # S, K x P
        self.log_weights: Optional[Tensor] = None  # log α (up to a constant), K
        self.baselines: Optional[Tensor] = None  # e⁰, K
        self.baseline_counts: Optional[Tensor] = None  # estimates averaged into e⁰, K
        self.steps = 0

    def forward(self, G: Tensor) -> Tensor:  # type: ignore[override]
        check_gradient_matrix(G)
        work = at_least_float32(G.detach())
        k = work.shape[0]
        if self.second_moments is None or self.second_moments.shape != work.shape:  # a new problem: warm up again
            self.second_moments = torch.zeros_like(work)
            self.log_weights = torch.zeros(k, dtype=work.dtype, device=work.device)
            self.baselines = torch.zeros(k, dtype=work.dtype, device=work.device)
            self.baseline_counts = torch.zeros(k, dtype=work.dtype, device=work.device)
            self.steps = 0
        self._follow(work)
        self.steps += 1
        squares = work.square()
        self.second_moments += squares  # absent rows add 0
        # e_k = g_kᵀ diag(√S + ε)⁻¹ g_k, in place: three passes over K x P, two temporaries
        risks = squares.div_(self.second_moments.sqrt().add_(self.eps)).sum(dim=1)
        present = risks > 0  # a zero row (an absent task) and only that has e_k = 0
        warming = self.steps <= self.warmup_steps
        fresh = present & (self.baseline_counts == 0)
        count = self.baseline_counts + (present if warming else fresh).to(work.dtype)
        self.baselines.copy_(torch.where(count > self.baseline_counts, self.baselines + (risks - self.baselines) / count, self.baselines))
        self.baseline_counts.copy_(count)
        logits = self.log_weights
        if not warming:  # α_k ∝ α_k exp(η e_k / e_k⁰) in log space (a weight never underflows to a final 0)
            ratios = risks / self.baselines.clamp_min(torch.finfo(work.dtype).tiny)
            grown = logits + self.lr * ratios
            mass = torch.logsumexp(torch.where(present, logits, -torch.inf), 0)  # the present tasks' total, kept
            shift = mass - torch.logsumexp(torch.where(present, grown, -torch.inf), 0)
            logits = torch.where(present, grown + shift, logits)
            self.log_weights.copy_(logits)
        return (masked_softmax(logits, present) @ work).to(G.dtype)

    @property
    def alpha(self) -> Optional[Tensor]:
        """The task weights ``α`` (on the simplex), or None before the first step."""
        return None if self.log_weights is None else torch.softmax(self.log_weights, dim=0)

    def _follow(self, work: Tensor) -> None:
        """Keep the state on the gradients' device and dtype (it may have been loaded elsewhere)."""
        if self.second_moments.dtype != work.dtype or self.second_moments.device != work.device:
            self.second_moments = self.second_moments.to(work)
        for name in ("log_weights", "baselines", "baseline_counts"):
            value = getattr(self, name)
            if value.dtype != work.dtype or value.device != work.device:
                setattr(self, name, value.to(work))

    def reset(self) -> None:
        self.second_moments = self.log_weights = self.baselines = self.baseline_counts = None
        self.steps = 0

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> ExcessMTL:
        super()._apply(fn, recurse)
        for name in ("second_moments", "log_weights", "baselines", "baseline_counts"):
            value = getattr(self, name)
            if value is not None:  # extra state: moved and cast like a buffer
                setattr(self, name, fn(value))
        return self

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "second_moments": self.second_moments,
            "log_weights": self.log_weights,
            "baselines": self.baselines,
            "baseline_counts": self.baseline_counts,
            "steps": self.steps,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.second_moments = loaded_copy(state["second_moments"])
        self.log_weights = loaded_copy(state["log_weights"])
        self.baselines = loaded_copy(state["baselines"])
        self.baseline_counts = loaded_copy(state["baseline_counts"])
        self.steps = int(state["steps"])
