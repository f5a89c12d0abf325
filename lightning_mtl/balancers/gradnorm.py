"""GradNorm: gradient normalisation (Chen et al., 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from lightning_mtl.balancers._utils import PrivateAdam, at_least_float32, check_range, loaded_copy
from lightning_mtl.balancers.base import GramianBalancer, check_nonzero


class GradNorm(GramianBalancer):
    """GradNorm, from `GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask
    Networks <https://arxiv.org/abs/1711.02257>`_ (Chen et al., ICML 2018), Algorithm 1.

    Learned loss weights ``w_k`` (starting at 1) make the weighted gradient norms
    ``G_k = w_k ‖∇L_k‖`` follow ``Ḡ · r_k^α``, with ``Ḡ`` the mean of the ``G_k``,
    ``r_k = L̃_k / mean_j L̃_j`` the relative inverse training rate and ``L̃_k = L_k / L_k(0)``. Each
    call returns the current ``w`` (the step's loss weights) and then updates it: one step of a
    private Adam on ``L_grad = Σ_k |G_k − Ḡ r_k^α|``, the target held constant as in the paper, so
    ``∂L_grad/∂w_k = sign(G_k − Ḡ r_k^α) ‖∇L_k‖``; then every ``w_k`` is floored at
    :attr:`min_weight` (``1e-3``; without it a task with a dominant gradient is pushed to a zero or
    negative weight, which would stop or reverse its descent) and ``w`` is renormalised to ``Σ w = K``.

    ``‖∇L_k‖ = √(G Gᵀ)_kk``: the norms of the unweighted task gradients at the layer whose Gramian
    the module passes (the paper uses the last shared layer; the module's representation mode is the
    closest). ``weights(gramian, losses)`` needs the step's losses; ``L_k(0)`` is a task's loss the
    first time it is present. The losses are reduced over DDP ranks before use, each task's over the
    ranks where it has a loss (``present``; the module passes it). Absent tasks (zero
    gradient) get weight 0, keep their ``w_k`` exactly (their Adam moments decay meanwhile) and are left
    out of ``Ḡ`` and of the mean loss ratio; the present tasks' ``w_k`` are renormalised to
    ``K − Σ_absent w_k``, so that ``Σ w = K`` still holds.
    State (``w``, ``L(0)``, the Adam state) is extra state, created at the first call.

    Native (torchjd has no GradNorm). The paper updates ``w`` with "standard update rules" and sets no
    separate learning rate; Adam makes the step independent of the gradient scale, and ``lr = 0.025``
    (a step of about 2.5 % of the initial weight) is this library's default, not the paper's.

    Args:
        alpha: the asymmetry ``α ≥ 0`` (0 equalises the gradient norms); default 1.5, as in
            LibMTL's GradNorm.
        lr: learning rate of the private Adam on ``w``.
    """

    #: Floor of every ``w_k`` after the Adam step, before renormalising: the weights stay positive.
    min_weight: ClassVar[float] = 1e-3

    def __init__(self, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__()
        self.alpha = check_range("alpha", alpha, 0.0)
        self.lr = check_range("lr", lr, 0.0, open_low=True)
        self._adam = PrivateAdam(lr=self.lr)
        self.reset()

    def weights(
        self,
        gramian: Tensor,
        losses: Optional[Tensor] = None,
        present: Optional[Tensor] = None,
        nonzero: Optional[Sequence[bool]] = None,
    ) -> Tensor:
        """The step's weights ``w`` (then updated). ``nonzero`` is checked but not needed: absent tasks are
        masked on the device."""
        if losses is None:
            raise ValueError("GradNorm needs the step's task losses: call weights(gramian, losses)")
        if gramian.ndim != 2 or gramian.shape != (losses.shape[0], losses.shape[0]):
            raise ValueError(
                f"gramian must be K x K for K = {losses.shape[0]} losses, got shape {tuple(gramian.shape)}"
            )
        check_nonzero(nonzero, gramian)
        norms = at_least_float32(gramian.detach()).diagonal().clamp_min(0).sqrt()
        # a task's loss is averaged over the processes that have it (``present``: this process's tasks)
        local = norms > 0 if present is None else present.to(norms.device)
        losses, _ = self._reduced_losses(losses.detach().to(norms.dtype), local)
        present = norms > 0  # the tasks with a gradient in the global batch
        if self.task_weights_ is None or self.task_weights_.shape != norms.shape:
            self.task_weights_ = torch.ones_like(norms)
            self.initial_losses = torch.full_like(norms, float("nan"))
            self._adam.reset()
        w = self.task_weights_
        first = present & torch.isnan(self.initial_losses)
        self.initial_losses = torch.where(first, losses, self.initial_losses)
        current = w * present  # this step's weights (absent tasks: 0)

        mask = present.to(norms.dtype)
        count = mask.sum().clamp_min(1)
        ratios = torch.where(present & (self.initial_losses > 0), losses / self.initial_losses, 1.0)
        inverse_rates = ratios / ((ratios * mask).sum() / count)
        grad_norms = w * norms
        targets = (grad_norms * mask).sum() / count * inverse_rates**self.alpha
        grad = torch.sign(grad_norms - targets) * norms * mask
        before = w.clone()
        self._adam.step(w, grad)
        # Absent tasks keep w_k exactly (Adam's momentum would still move it). Present ones are floored
        # (a weight <= 0 would drop or ascend its task), then share what the absent ones leave of Σ w = K.
        stepped = torch.where(present, w.clamp_min(self.min_weight), 0.0)
        share = (w.numel() - (before * ~present).sum()) / stepped.sum().clamp_min(torch.finfo(w.dtype).tiny)
        w.copy_(torch.where(present, stepped * share, before))
        return current

    def reset(self) -> None:
        self.task_weights_: Optional[Tensor] = None  # w, one per task
        self.initial_losses: Optional[Tensor] = None  # L(0); NaN until a task is first present
        self._adam.reset()

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "weights": self.task_weights_,
            "initial_losses": self.initial_losses,
            "optimizer": self._adam.state_dict(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.task_weights_ = loaded_copy(state["weights"])
        self.initial_losses = loaded_copy(state["initial_losses"])
        self._adam.load_state_dict(state["optimizer"])
