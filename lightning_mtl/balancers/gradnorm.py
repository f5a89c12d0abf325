"""GradNorm: gradient normalisation (Chen et al., 2018)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_mtl.balancers._utils import _adam, at_least_float32, at_least_float32_dtype, check_range, loaded_copy
from lightning_mtl.balancers.base import GramianBalancer, check_nonzero


class HostAdam:
    """Adam (Kingma & Ba, 2015, Algorithm 1) on a NumPy vector, checkpointed in ``torch.optim.Adam``'s format.

    GradNorm's private optimizer on its K weights: a ``torch.optim.Adam`` step costs about a tenth of a
    millisecond of Python per call, this a few microseconds. Computed on Python floats (float64), the
    parameter and the moments stored in the parameter's dtype (so that a state saved and loaded
    resumes bit for bit).
    :meth:`state_dict` is what ``torch.optim.Adam(...).state_dict()`` gives for one parameter (``None``
    before the first step), and :meth:`load_state_dict` reads it, hyper-parameters included, as
    ``torch.optim.Adam`` does: checkpoints written with the former ``torch.optim.Adam`` load unchanged.
    """

    def __init__(self, lr: float) -> None:
        self.defaults = _adam([torch.zeros(1)], {"lr": lr}).state_dict()["param_groups"][0]
        self.reset()

    def reset(self) -> None:
        self.group = dict(self.defaults)
        self.steps = 0
        self.exp_avg: Optional[np.ndarray] = None
        self.exp_avg_sq: Optional[np.ndarray] = None

    def step(self, param: np.ndarray, grad: list[float]) -> None:
        """One step on ``param`` (in place) along ``grad``."""
        if self.exp_avg is None or self.exp_avg.shape != param.shape:
            self.exp_avg, self.exp_avg_sq = np.zeros_like(param), np.zeros_like(param)
        beta1, beta2 = self.group["betas"]
        self.steps += 1
        exp_avg = [beta1 * m + (1.0 - beta1) * g for m, g in zip(self.exp_avg.tolist(), grad)]
        exp_avg_sq = [beta2 * v + (1.0 - beta2) * g * g for v, g in zip(self.exp_avg_sq.tolist(), grad)]
        self.exp_avg[:], self.exp_avg_sq[:] = exp_avg, exp_avg_sq
        step_size = self.group["lr"] / (1.0 - beta1**self.steps)
        root_correction, eps = math.sqrt(1.0 - beta2**self.steps), self.group["eps"]
        param[:] = [
            p - step_size * m / (math.sqrt(v) / root_correction + eps)
            for p, m, v in zip(param.tolist(), exp_avg, exp_avg_sq)
        ]

    def state_dict(self) -> Optional[dict[str, Any]]:
        if self.exp_avg is None:
            return None
        state = {
            "step": torch.tensor(float(self.steps)),
            "exp_avg": torch.from_numpy(self.exp_avg.copy()),
            "exp_avg_sq": torch.from_numpy(self.exp_avg_sq.copy()),
        }
        return {"state": {0: state}, "param_groups": [dict(self.group)]}

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        self.reset()
        if state is None:
            return
        self.group = {**self.defaults, **state["param_groups"][0]}
        moments = state["state"].get(0)
        if moments is not None:
            self.steps = int(moments["step"])
            self.exp_avg = moments["exp_avg"].detach().cpu().numpy().copy()
            self.exp_avg_sq = moments["exp_avg_sq"].detach().cpu().numpy().copy()




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
    State (``w``, ``L(0)``, the Adam state) is extra state, created at the first call, kept on the host.

    Native (torchjd has no GradNorm), on the host: the K norms and losses are read once (the module
    already reads the Gramian for its finiteness check) and the update is computed on Python floats
    (float64; for the few tasks of a step a list of K numbers costs less than a NumPy or torch call),
    its private Adam being :class:`HostAdam` (``torch.optim.Adam``'s math and checkpoint format, a small
    fraction of its per-call cost); ``w``, ``L(0)`` and the moments are stored in the Gramian's dtype
    (at least float32), so that a resumed run continues bit for bit. The paper updates ``w`` with "standard update rules" and sets no
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
        self._adam = HostAdam(lr=self.lr)
        self.reset()

    def weights(
        self,
        gramian: Tensor,
        losses: Optional[Tensor] = None,
        present: Optional[Tensor] = None,
        nonzero: Optional[Sequence[bool]] = None,
        entries: Optional[Sequence[float]] = None,
    ) -> Tensor:
        """The step's weights ``w`` (then updated). ``nonzero`` is checked but not needed (the diagonal is read);
        ``entries``, the Gramian's entries as Python floats row by row (the module has read them), spare that read."""
        if losses is None:
            raise ValueError("GradNorm needs the step's task losses: call weights(gramian, losses)")
        if gramian.ndim != 2 or gramian.shape != (losses.shape[0], losses.shape[0]):
            raise ValueError(
                f"gramian must be K x K for K = {losses.shape[0]} losses, got shape {tuple(gramian.shape)}"
            )
        check_nonzero(nonzero, gramian)
        k = gramian.shape[0]
        dtype = at_least_float32_dtype(gramian.dtype)
        if entries is None:
            squared = at_least_float32(gramian.detach()).diagonal().tolist()
        else:
            squared = list(entries[:: k + 1])
        losses = losses.detach()
        if losses.dtype != dtype:
            losses = losses.to(dtype)
        if self.distributed:  # a task's loss is averaged over the processes that have it (``present``: this process's)
            local = torch.tensor([value > 0 for value in squared]) if present is None else present
            losses = self._reduced_losses(losses, local.to(losses.device))[0]
        norms = [math.sqrt(value) if value > 0 else 0.0 for value in squared]
        losses_now = losses.tolist()
        if self.task_weights_ is None or self.task_weights_.shape != (k,):
            self.task_weights_ = torch.ones(k, dtype=dtype)
            self.initial_losses = torch.full((k,), float("nan"), dtype=dtype)
            self._adam.reset()
        present = [norm > 0.0 for norm in norms]  # the tasks with a gradient in the global batch
        w = self.task_weights_.tolist()
        initial = self.initial_losses.tolist()
        if any(has and math.isnan(first) for first, has in zip(initial, present)):  # a task's first loss: L(0)
            initial = [loss if has and math.isnan(first) else first for loss, first, has in zip(losses_now, initial, present)]
            self.initial_losses.numpy()[:] = initial  # written only then (a NumPy view costs ~30 µs inside a step)
        current = [weight if has else 0.0 for weight, has in zip(w, present)]  # this step's weights

        count = max(sum(present), 1)
        ratios = [loss / first if has and first > 0 else 1.0 for loss, first, has in zip(losses_now, initial, present)]
        mean_ratio = sum(ratio for ratio, has in zip(ratios, present) if has) / count or 1.0
        grad_norms = [weight * norm for weight, norm in zip(w, norms)]
        mean_norm = sum(value for value, has in zip(grad_norms, present) if has) / count
        grad = [
            math.copysign(norm, value - target) if has and value != target else 0.0
            for value, norm, has, target in zip(
                grad_norms, norms, present, (mean_norm * (ratio / mean_ratio) ** self.alpha for ratio in ratios)
            )
        ]
        parameter = self.task_weights_.numpy()
        self._adam.step(parameter, grad)
        # Absent tasks keep w_k exactly (Adam's momentum would still move it). Present ones are floored
        # (a weight <= 0 would drop or ascend its task), then share what the absent ones leave of Σ w = K.
        stepped = [max(value, self.min_weight) if has else 0.0 for value, has in zip(parameter.tolist(), present)]
        kept = sum(before for before, has in zip(w, present) if not has)
        share = (k - kept) / (sum(stepped) or 1.0)  # no task present: every weight is kept
        parameter[:] = [value * share if has else before for value, before, has in zip(stepped, w, present)]
        weights = torch.tensor(current, dtype=self.task_weights_.dtype)
        return weights if gramian.device.type == "cpu" else weights.to(gramian.device, non_blocking=True)

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
        weights, initial = loaded_copy(state["weights"]), loaded_copy(state["initial_losses"])
        self.task_weights_ = None if weights is None else weights.cpu().contiguous()
        self.initial_losses = None if initial is None else initial.cpu().contiguous()
        self._adam.load_state_dict(state["optimizer"])
