"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., 2022)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from lightning_mtl.balancers._utils import check_range, loaded_copy, require_modules
from lightning_mtl.balancers.base import GramianBalancer


def gramian_factor(gramian: Tensor) -> Tensor:
    """A K × K matrix ``M`` with ``M Mᵀ = gramian`` (from its eigendecomposition)."""
    values, vectors = torch.linalg.eigh(gramian)
    return vectors * values.clamp_min(0).sqrt()


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class NashMTL(GramianBalancer):
    """Nash-MTL, from `Multi-Task Learning as a Bargaining Game <https://arxiv.org/abs/2202.01017>`_
    (Navon et al., ICML 2022), Algorithm 1.

    The update is the Nash bargaining solution between tasks: ``d = Gᵀ α`` with ``α`` solving
    ``(G Gᵀ) α = 1/α`` (elementwise), found by a sequence of convex problems warm-started from the
    previous step's ``α``; the direction is clipped to norm ``max_norm``.

    Wraps ``torchjd.aggregation.NashMTL``, which solves with cvxpy (building this class without it
    raises ``ImportError``: install ``lightning-mtl[solvers]``). torchjd's version takes the gradient
    matrix but uses only ``G Gᵀ`` and ``‖Gᵀ α‖``, so it is a Gramian weighting: it is given a K × K
    factor ``M`` with ``M Mᵀ = G Gᵀ``. The warm start ``α`` is extra state (a resumed run restarts its
    ``update_weights_every`` cycle but keeps the warm start). A step with absent tasks is solved on
    the present tasks only, without warm start, and leaves the warm start unchanged. A single task is
    solved in closed form (``α = 1``, then clipped), since cvxpy rejects the 1 × 1 problem.

    Args:
        max_norm: clip ``‖d‖`` to this (0 disables).
        update_weights_every: solve every this many steps, reuse ``α`` in between.
        optim_niter: iterations of the sequential convex solver.
    """

    def __init__(self, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20) -> None:
        super().__init__()
        self.max_norm = check_range("max_norm", max_norm, 0.0)
        self.update_weights_every = _positive_int("update_weights_every", update_weights_every)
        self.optim_niter = _positive_int("optim_niter", optim_niter)
        require_modules("NashMTL", ["cvxpy", "ecos"])
        self._solver: Any = None
        self._warm_start: Optional[Tensor] = None
        self._solver_step = 0.0  # torchjd's step count (when to re-solve), for a solver rebuilt from a checkpoint

    def _new_solver(self, num_tasks: int) -> Any:
        from torchjd.aggregation import NashMTL as TorchjdNashMTL

        return TorchjdNashMTL(
            n_tasks=num_tasks,
            max_norm=self.max_norm,
            update_weights_every=self.update_weights_every,
            optim_niter=self.optim_niter,
        ).weighting

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        if gramian.shape[0] == 1:
            # One task (cvxpy rejects the 1 x 1 problem): torchjd normalises the Gramian by its norm, so
            # the bargaining solution is alpha = 1, then clipped like torchjd's to ‖alpha g‖ <= max_norm.
            norm = gramian[0, 0].sqrt()
            clip = self.max_norm > 0 and bool(norm > self.max_norm)
            return (self.max_norm / norm).reshape(1) if clip else torch.ones_like(gramian[0])
        factor = gramian_factor(gramian)
        if not bool(present.all()):
            return self._new_solver(gramian.shape[0])(factor)
        if self._solver is None or self._solver.n_tasks != gramian.shape[0]:
            self._solver = self._new_solver(gramian.shape[0])
            if self._warm_start is not None and self._warm_start.numel() == gramian.shape[0]:
                self._solver.prvs_alpha = self._warm_start.numpy().astype("float32")
                if self._solver_step > 0:  # continue the re-solve schedule of update_weights_every
                    self._solver._init_optim_problem()
                    self._solver.step = self._solver_step
        weights = self._solver(factor)
        self._warm_start = torch.as_tensor(self._solver.prvs_alpha, dtype=torch.float32).clone()
        return weights

    def reset(self) -> None:
        self._solver = None
        self._warm_start = None
        self._solver_step = 0.0

    def get_extra_state(self) -> dict[str, Any]:
        step = float(getattr(self._solver, "step", self._solver_step)) if self._solver is not None else self._solver_step
        return {"warm_start": self._warm_start, "solver_step": step}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._warm_start = loaded_copy(state["warm_start"])
        self._solver_step = float(state.get("solver_step", 0.0))  # absent from checkpoints written before it
        self._solver = None
