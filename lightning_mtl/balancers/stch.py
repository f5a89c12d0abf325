"""STCH: smooth Tchebycheff scalarization (Lin et al., 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor
from torchjd.scalarization import STCH as _TorchjdSTCH

from lightning_mtl.balancers._utils import all_present, at_least_float32, check_range
from lightning_mtl.balancers.base import NonlinearScalarization


class STCH(NonlinearScalarization):
    """Smooth Tchebycheff scalarization, from `Smooth Tchebycheff Scalarization for Multi-Objective
    Optimization <https://arxiv.org/abs/2402.19078>`_ (Lin et al., ICML 2024).

    The loss is ``μ log Σ_k exp(λ_k (L_k − z_k) / μ)``, a smooth upper bound of the worst weighted
    loss ``max_k λ_k (L_k − z_k)`` that tightens as ``μ`` decreases: the step favours the tasks that
    are worst off. ``λ_k = 1/K`` (K counting every task, present or not) and the ideal point ``z`` defaults to 0. Wraps
    ``torchjd.scalarization.STCH``; absent tasks are given the lowest finite loss, so that their term
    vanishes. The official multi-task recipe also normalises ``log L_k`` by a nadir point estimated
    over warm-up epochs; that schedule is not part of this class. Under DDP every process weighs its
    losses by the weights at the global batch's losses (see
    :class:`~lightning_mtl.balancers.base.NonlinearScalarization`).

    Args:
        mu: the smoothing ``μ > 0``; the paper evaluates 0.01 to 1.
        reference: the ideal point ``z`` (one value per task), or ``None`` for 0.
    """

    def __init__(self, mu: float = 1.0, reference: Optional[list[float]] = None) -> None:
        super().__init__()
        self.mu = check_range("mu", mu, 0.0, open_low=True)
        self.reference = None if reference is None else [float(value) for value in reference]

    def setup(self, task_names: Sequence[str], task_weights: Optional[Sequence[float]] = None) -> None:
        super().setup(task_names, task_weights)
        if self.reference is not None and len(self.reference) != self.num_tasks:
            raise ValueError(f"reference has {len(self.reference)} values for {self.num_tasks} tasks")
        # Built once; the ideal point is a (non-persistent) buffer, so it follows the module's device.
        self.scalarizer = _TorchjdSTCH(self.mu)
        reference = None if self.reference is None else torch.tensor(self.reference)
        self.register_buffer("reference_point", reference, persistent=False)

    def _scalarize(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        self._require_setup(losses)
        scalarizer = self.scalarizer
        reference = self.reference_point
        if reference is not None:
            reference = scalarizer.reference = reference.to(losses.dtype)
        every = all_present(present)
        values = losses if every else torch.where(present, losses, torch.finfo(losses.dtype).min / 4)
        # torchjd's scalarization, with its graph: the model's gradient comes from torchjd's own math.
        value = scalarizer(values)
        # The effective weights ∂value/∂L_k, returned for logging, in closed form: the gradient of
        # μ log Σ exp(λ (L − z) / μ) is λ softmax(λ (L − z) / μ) (a separate autograd.grad would
        # cost more than the rest of the method on a small model; the tests check it against autograd).
        shifted = at_least_float32(values.detach() if reference is None else values.detach() - reference)
        scale = 1.0 / losses.numel()  # λ_k = 1/K, torchjd's default preference
        weights = (torch.softmax(shifted * (scale / self.mu), dim=0) * scale).to(losses.dtype)
        if not every:  # absent tasks: weight 0; no task at all: a zero loss
            value = torch.where(present.any(), value, 0.0)
            weights = torch.where(present, weights, 0.0)
        return value, weights
