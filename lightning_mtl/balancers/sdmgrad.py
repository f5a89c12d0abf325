"""SDMGrad: stochastic direction-oriented multi-objective gradient descent (Xiao et al., 2023)."""

from __future__ import annotations

import numbers
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_mtl.balancers._qp import trace_normalised
from lightning_mtl.balancers._utils import Seeded, check_range, loaded_copy
from lightning_mtl.balancers.base import GramianBalancer


def project_simplex(v: np.ndarray) -> np.ndarray:
    """The Euclidean projection of ``v`` onto the probability simplex ``{x ≥ 0, Σ x = 1}``.

    The sort-based algorithm (Held, Wolfe & Crowder 1974; Duchi et al. 2008): ``x = max(v − θ, 0)`` with
    the threshold ``θ`` that makes the kept entries sum to 1. ``v`` is first shifted by its largest entry (the
    projection is invariant to adding a constant to every entry), so that the 1 is not lost in the rounding of
    entries far from 0 (MoCo's step on an un-normalised Gramian).
    """
    top = v.max()
    v = v - top
    if not np.isfinite(top):  # NaN or an infinite entry: no projection (NaN entries, as the arithmetic gives)
        return np.maximum(v - np.nan, 0.0)
    excess, total, count = [], 0.0, 0  # a loop over Python floats: faster than NumPy calls for small K
    for j, u in enumerate(sorted(v.tolist(), reverse=True), start=1):
        total += u
        excess.append(total - 1.0)
        count += u * j > total - 1.0  # u_j > (Σ_{i≤j} u_i − 1) / j: true for a prefix
    return np.maximum(v - excess[count - 1] / count, 0.0)


def inner_steps(A: np.ndarray, target: np.ndarray, w: np.ndarray, lr: float, num_iters: int) -> np.ndarray:
    """``num_iters`` projected-gradient steps ``w ← Π_Δ(w − lr (A w + target))`` from the simplex point ``w``.

    Two tasks: in scalars (:func:`_pair_steps`). More: ``w − lr (A w + target) = [B | c] (w, 1)`` with
    ``B = I − lr A``, ``c = −lr target``. While a step keeps the support ``S`` of ``w``, the projection is
    ``v − θ`` on ``S`` with ``θ = (Σ_S v − 1) / |S|``, affine in ``w_S``: :func:`_support_map` gives the step as
    one matrix–vector product whose entries are all ``≥ 0`` exactly when ``S`` is still the projection's support
    (``v_i ≥ θ`` on ``S``, ``v_j ≤ θ`` off it). A step that fails this check is taken by :func:`project_simplex`.
    """
    if w.size == 2:
        return _pair_steps(A, target, w, lr, num_iters)
    affine = np.concatenate([np.eye(w.size) - lr * A, -lr * target[:, None]], axis=1)
    point, inside, step = np.append(w, 1.0), w > 0, None  # point: (w_S, garbage off S, 1) once step is set
    for _ in range(num_iters):
        if step is not None:
            z = step @ point
            if min(z.tolist()) >= 0.0:  # a Python min: a fraction of ndarray.min's cost at this size
                point = z
                continue
            point[:-1] *= inside
        point[:-1] = project_simplex(affine @ point)
        inside = point[:-1] > 0
        step = _support_map(affine, inside)
    return point[:-1] * inside


def _support_map(affine: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """The matrix ``T`` of :func:`inner_steps` for the support ``S`` (the mask ``inside``). With ``v = affine (w, 1)``
    and ``θ = (Σ_S v − 1) / |S|``, ``T (w, 1)`` is ``(v_i − θ`` on ``S``, ``θ − v_j`` off it, ``1)``; ``T`` reads
    only ``w_S`` (its columns off ``S`` are 0), so the entries off ``S`` of the point it is applied to are ignored."""
    theta = inside @ affine  # θ as a row on (w, 1)
    theta[-1] -= 1.0
    theta /= np.count_nonzero(inside)
    step = np.zeros((affine.shape[0] + 1, affine.shape[1]))
    step[:-1] = (affine - theta) * np.where(inside, 1.0, -1.0)[:, None]
    step[:-1, :-1] *= inside
    step[-1, -1] = 1.0
    return step


def _pair_steps(A: np.ndarray, target: np.ndarray, w: np.ndarray, lr: float, num_iters: int) -> np.ndarray:
    """:func:`inner_steps` for two tasks (:func:`pair_steps` on the NumPy arrays)."""
    (a11, a12), (a21, a22) = (lr * A).tolist()
    t1, t2 = (lr * target).tolist()
    return np.array(pair_steps(a11, a12, a21, a22, t1, t2, *w.tolist(), num_iters))


def pair_steps(
    a11: float, a12: float, a21: float, a22: float, t1: float, t2: float, w1: float, w2: float, num_iters: int
) -> tuple[float, float]:
    """:func:`inner_steps` for two tasks in Python floats, with ``lr A`` and ``lr target`` given entry by entry: the
    projection of ``v`` onto the simplex is ``(x, 1 − x)`` with ``x = (1 + v_1 − v_2) / 2`` clipped to ``[0, 1]``."""
    for _ in range(num_iters):
        v1 = w1 - (a11 * w1 + a12 * w2 + t1)
        v2 = w2 - (a21 * w1 + a22 * w2 + t2)
        w1 = min(max(0.5 * (1.0 + v1 - v2), 0.0), 1.0)
        w2 = 1.0 - w1
    return w1, w2


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class SDMGrad(Seeded, GramianBalancer):
    """Stochastic direction-oriented multi-objective gradient descent, from `Direction-oriented
    Multi-objective Learning: Simple and Provable Stochastic Algorithms <https://arxiv.org/abs/2305.18409>`_
    (Xiao, Ban & Ji, NeurIPS 2023).

    The direction is kept near a target, here the average gradient ``g₀ = Gᵀ 1/K``: with simplex weights
    ``w`` solving ``min_{w ∈ Δ} ½ ‖Gᵀw + λ g₀‖²``, the step is ``d = (Gᵀw + λ g₀) / (1 + λ)``, i.e. the
    Gramian weighting ``(w + λ/K) / (1 + λ)``. ``λ = 0`` is MGDA's min-norm direction, ``λ → ∞`` the
    mean gradient. SDMGrad does not solve for ``w`` at each step: ``w`` is carried from step to step and
    moved by ``num_iters`` projected-gradient steps ``w ← Π_Δ(w − lr ∇)``, ``∇ = (G Gᵀ)(w + λ/K)`` (the
    gradient of the objective above; the paper's inner update).

    The paper estimates ``∇`` from two independent samples and the direction from a third, so that each
    is unbiased. ``MultiTaskModule`` balances one batch: here all three use that batch's task gradients
    (its Gramian), as the usual one-batch practice does; the weights are then those of the batch's own
    objective. Under DDP that batch is the global one: every rank runs the same update.

    The Gramian is divided by its trace before the inner steps, so that its largest eigenvalue is at most
    1 and ``lr = 1`` stays within the ``1/L`` step of projected gradient descent whatever the gradients'
    scale and K (the paper normalises the Gramian's scale too). ``w`` (extra state, checkpointed) starts
    uniform. A step without some tasks runs on the present ones, from their part of ``w`` renormalised to
    sum to 1, and writes it back at the same total: the absent tasks' entries are kept exactly.

    Objective sampling (SDMGrad-OS, ``num_sampled = n < K``): each step draws ``n`` of the present tasks
    uniformly without replacement, from the balancer's own generator (the same on every DDP rank, continued
    on resume), and uses only their gradients: the inner updates run on the drawn tasks' part of ``w``
    (renormalised, then written back at the same total; the other entries are kept) and the direction is
    ``(G_Sᵀ w_S + λ g₀) / (1 + λ)``, the target ``g₀`` staying the mean of all the tasks (one backward of
    the mean loss in the paper's setting). The variant exists to compute ``n`` task gradients instead of
    ``K``; the module computes them all anyway, so here it changes the method (a randomised step), not the
    step's cost.

    Args:
        lam: the pull ``λ ≥ 0`` toward the average gradient; 0.3 as in the paper's experiments.
        lr: step of the inner projected-gradient updates on the trace-normalised Gramian.
        num_iters: inner projected-gradient updates per training step.
        num_sampled: SDMGrad-OS's ``n`` (objectives sampled per step); None (default) uses every task.
        seed: seed of the balancer's generator (used by SDMGrad-OS only).
    """

    def __init__(
        self, lam: float = 0.3, lr: float = 1.0, num_iters: int = 20, num_sampled: Optional[int] = None, seed: int = 0
    ) -> None:
        super().__init__()
        self.lam = check_range("lam", lam, 0.0)
        self.lr = check_range("lr", lr, 0.0, open_low=True)
        self.num_iters = _positive_int("num_iters", num_iters)
        self.num_sampled = None if num_sampled is None else _positive_int("num_sampled", num_sampled)
        self._init_generator(seed)
        self.simplex_weights: Optional[Tensor] = None  # w, float64, on CPU

    def _simplex_state(self, k_all: int) -> Tensor:
        """``w`` for ``k_all`` tasks, float64 on the CPU: uniform at first."""
        if self.simplex_weights is None or self.simplex_weights.numel() != k_all:
            self.simplex_weights = torch.full((k_all,), 1.0 / k_all, dtype=torch.float64)
        elif self.simplex_weights.device.type != "cpu" or self.simplex_weights.dtype != torch.float64:
            self.simplex_weights = self.simplex_weights.to("cpu", torch.float64)  # e.g. loaded onto a GPU
        return self.simplex_weights

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        self._simplex_state(present.numel())
        A = gramian.detach().numpy().astype(np.float64)
        A /= A.trace()
        k = A.shape[0]
        target = A.sum(axis=1) * (self.lam / k)  # (G Gᵀ) λ/K: the pull toward g₀ = Gᵀ 1/K
        rows = np.flatnonzero(present.numpy())  # the present tasks' entries of w
        if self.num_sampled is not None and self.num_sampled < k:  # SDMGrad-OS
            chosen = np.sort(torch.randperm(k, generator=self.generator)[: self.num_sampled].numpy())
            A, target, rows = A[np.ix_(chosen, chosen)], target[chosen], rows[chosen]
        else:
            chosen = slice(None)
        state = self.simplex_weights.numpy()  # shares memory with the state: written back in place
        mass = float(state[rows].sum())
        w = state[rows] / mass if mass > 0 else np.full(rows.size, 1.0 / rows.size)
        w = inner_steps(A, target, w, self.lr, self.num_iters)
        if mass > 0:
            state[rows] = w * mass
        weights = np.full(k, self.lam / k)
        weights[chosen] += w
        return torch.from_numpy(weights / (1.0 + self.lam))

    def _pair_weights(self, a: float, b: float, c: float, dtype: torch.dtype) -> Optional[tuple[float, float]]:
        if self.num_sampled is not None and self.num_sampled < 2:  # SDMGrad-OS draws: the general path
            return None
        pull, lr = self.lam / 2, self.lr
        a, b, c = trace_normalised(a, b, c)
        w1, w2 = self._simplex_state(2).tolist()
        mass = w1 + w2
        w1, w2 = (w1 / mass, w2 / mass) if mass > 0 else (0.5, 0.5)
        t1, t2 = (a + b) * pull, (b + c) * pull
        w1, w2 = pair_steps(lr * a, lr * b, lr * b, lr * c, lr * t1, lr * t2, w1, w2, self.num_iters)
        if mass > 0:
            self.simplex_weights = torch.tensor([w1 * mass, w2 * mass], dtype=torch.float64)
        return (pull + w1) / (1.0 + self.lam), (pull + w2) / (1.0 + self.lam)

    def reset(self) -> None:
        super().reset()
        self.simplex_weights = None

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "simplex_weights": self.simplex_weights}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.simplex_weights = loaded_copy(state["simplex_weights"])
