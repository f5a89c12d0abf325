"""FAMO: fast adaptive multitask optimization (Liu et al., 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from lightning_mtl.balancers._utils import (
    PrivateAdam,
    all_present,
    check_range,
    masked_softmax,
)
from lightning_mtl.balancers.base import Balancer


class FAMO(Balancer):
    """Fast adaptive multitask optimization, from `FAMO: Fast Adaptive Multitask Optimization
    <https://arxiv.org/abs/2306.03792>`_ (Liu et al., NeurIPS 2023).

    FAMO decreases every loss at about the same *relative* rate using loss values only. With
    logits ``ξ`` and ``z = softmax(ξ)`` over the present tasks, the step follows
    ``Σ_k c z_k ∇ log(L_k − b_k + ε)``, i.e. the task weights are ``w_k = c z_k / (L_k − b_k + ε)``,
    with ``c`` normalising them to sum to 1. After the optimizer step the module passes the same
    batch's losses, recomputed with the updated model, to :meth:`after_optimizer_step`; with
    ``δ_k = log(L_k^before − b_k + ε) − log(L_k^after − b_k + ε)``, ``ξ`` takes one Adam step along
    ``∇_ξ (zᵀ δ) = z ⊙ (δ − zᵀδ)`` with weight decay ``γ`` (the paper's Algorithm 2): tasks that
    improved less than average gain weight. The loss returned by ``forward`` is ``Σ_k w_k L_k`` (same
    gradient as FAMO's objective; its value is a weighted mean of the losses). The recompute is one
    extra forward pass per step, most of FAMO's cost; the next step's losses (another batch) are not
    a faithful substitute for it (see ``docs/balancers.md``), so there is no such option.

    Implemented here rather than wrapping ``torchjd.scalarization.FAMO``: that class keeps its
    logits as an ``nn.Parameter`` that gets no gradient in the model's backward (which DDP rejects)
    and its Adam state and pre-step losses as plain attributes (lost on checkpoint), and cannot leave
    out absent tasks. Here the logits and the pre-step losses are buffers and the Adam state is extra
    state; the losses that drive the weights and the update are reduced over DDP ranks, each task's
    over the ranks where it has labels, before and after the step alike. A task absent from the step
    (on every rank) gets weight 0 and keeps its logit exactly.

    Args:
        lr: learning rate of the logits' private Adam; the paper uses 0.025.
        weight_decay: the regularisation ``γ`` on the logits; 1e-3 as in the paper's Algorithm 2
            (the official code uses 1e-5).
        min_losses: lower bounds ``b_k`` of the losses (default 0): ``L_k − b_k`` must stay positive.
    """

    needs_losses_after_step: ClassVar[bool] = True
    forward_changes_state: ClassVar[bool] = True
    eps: ClassVar[float] = 1e-8

    def __init__(self, lr: float = 0.025, weight_decay: float = 1e-3, min_losses: Optional[list[float]] = None) -> None:
        super().__init__()
        self.lr = check_range("lr", lr, 0.0, open_low=True)
        self.weight_decay = check_range("weight_decay", weight_decay, 0.0)
        self.min_losses = None if min_losses is None else [float(value) for value in min_losses]
        self._adam = PrivateAdam(lr=self.lr, weight_decay=self.weight_decay)

    def setup(self, task_names: Sequence[str], task_weights: Optional[Sequence[float]] = None) -> None:
        super().setup(task_names, task_weights)
        k = self.num_tasks
        bounds = [0.0] * k if self.min_losses is None else self.min_losses
        if len(bounds) != k:
            raise ValueError(f"min_losses has {len(bounds)} values for {k} tasks")
        self.register_buffer("lower_bounds", torch.tensor(bounds))
        self.register_buffer("logits", torch.zeros(k))
        self.register_buffer("losses_before", torch.zeros(k))
        self.register_buffer("seen_before", torch.zeros(k, dtype=torch.bool))
        # this process's own mask of the step: the recomputed losses are reduced with it (not saved)
        self.register_buffer("present_before", torch.zeros(k, dtype=torch.bool), persistent=False)

    def _log_shifted(self, losses: Tensor, seen: Optional[Tensor] = None) -> Tensor:
        """``log(L_k − b_k + ε)``; with ``seen``, for the tasks seen only (0 for the others)."""
        shifted = losses - self.lower_bounds.to(losses) + self.eps
        return (shifted if seen is None else torch.where(seen, shifted, 1.0)).log()

    def forward(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        self._require_setup(losses)
        mean, seen = self._reduced_losses(losses, present)
        every = all_present(seen)  # the common step takes the path without masks
        shifted = mean - self.lower_bounds.to(mean) + self.eps
        if every:
            ratio = torch.softmax(self.logits, dim=0).to(losses) / shifted.to(losses)
        else:
            ratio = masked_softmax(self.logits, seen).to(losses) / torch.where(seen, shifted, 1.0).to(losses)
        weights = ratio / ratio.sum().clamp_min(torch.finfo(ratio.dtype).tiny)
        if not (every and (present is seen or all_present(present))):
            weights = torch.where(present, weights, 0.0)
        self.losses_before.copy_(mean)
        self.seen_before.copy_(seen)
        self.present_before.copy_(present)
        return weights @ losses, weights

    def after_optimizer_step(self, losses: Tensor) -> None:
        """Update the logits from this step's losses recomputed on the same batch after the optimizer step.

        ``losses`` are this process's, on the batch ``forward`` saw: they are reduced over the ranks that
        had each task in that step (this process's ``present`` then, not the global mask: a rank without
        a task's labels must not add its zero loss to the mean). Tasks seen on no rank in the step keep
        their logit exactly (Adam's momentum and weight decay would otherwise still move it).
        """
        self._require_setup(losses)
        seen = self.seen_before
        after, _ = self._reduced_losses(losses, self.present_before)  # seen on the same ranks as before
        if all_present(seen):
            z = torch.softmax(self.logits, dim=0)
            delta = self._log_shifted(self.losses_before) - self._log_shifted(after)
            self._adam.step(self.logits, z * (delta - z @ delta))
            return
        z = masked_softmax(self.logits, seen)
        delta = self._log_shifted(self.losses_before, seen) - self._log_shifted(after, seen)
        kept = self.logits.clone()
        self._adam.step(self.logits, z * (delta - z @ delta))
        self.logits.copy_(torch.where(seen, self.logits, kept))

    @property
    def task_probabilities(self) -> Tensor:
        """``z = softmax(ξ)`` over all tasks."""
        return torch.softmax(self.logits, dim=0)

    def reset(self) -> None:
        self.logits.zero_()
        self.losses_before.zero_()
        self.seen_before.zero_()
        self.present_before.zero_()
        self._adam.reset()

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": self._adam.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._adam.load_state_dict(state["optimizer"])
