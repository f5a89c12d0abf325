"""Per-task gradients of the shared part of a multi-task model, and their reduction across DDP ranks.

Two kinds, chosen by ``MultiTaskModule(gradients=...)``:

``"parameters"``
    the exact Jacobian ``J`` (K × P) of the K task losses with respect to the shared (backbone)
    parameters. Under DDP the balancer must see the Jacobian of the *global* batch, which is the mean
    of the ranks' Jacobians: ``J`` itself is all-reduced (a K × P message) before the Gramian
    ``J Jᵀ`` is formed — averaging per-rank Gramians or per-rank balancer outputs would not be exact.
``"representation"``
    the Jacobian with respect to the backbone *output* (MGDA-UB, Sener & Koltun 2018): one batched
    backward through the heads only, much cheaper. Each rank's representation rows are its own, so the
    global Gramian is the sum of the local ones divided by ``world_size²`` (the global loss is the
    mean of the ranks' losses): a K × K message.

Both use one batched vector-Jacobian product (``torch.autograd.grad(..., is_grads_batched=True)``) over
the K one-hot output gradients, and fall back to K separate backward passes for modules that cannot be
batched (e.g. cuDNN RNNs, reentrant checkpointing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Optional

import torch
from torch import Tensor

GradientMode = Literal["parameters", "representation"]
GRADIENT_MODES = ("parameters", "representation")


def task_jacobian(losses: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    """The K × N Jacobian of the K ``losses`` with respect to ``inputs`` (flattened and concatenated).

    Inputs that a loss does not depend on get zero rows; the graph is kept for the later backward.
    """
    num_tasks = losses.shape[0]
    eye = torch.eye(num_tasks, dtype=losses.dtype, device=losses.device)
    try:
        grads = torch.autograd.grad(
            losses, inputs, eye, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except RuntimeError:  # an operation without a batching rule: one backward pass per task
        rows = [
            torch.autograd.grad(losses, inputs, eye[k], retain_graph=True, allow_unused=True) for k in range(num_tasks)
        ]
        grads = tuple(
            torch.stack([row[i] if row[i] is not None else torch.zeros_like(x) for row in rows])
            if any(row[i] is not None for row in rows)
            else None
            for i, x in enumerate(inputs)
        )
    return torch.cat(
        [
            (g if g is not None else x.new_zeros((num_tasks, *x.shape))).reshape(num_tasks, -1).to(losses.dtype)
            for g, x in zip(grads, inputs)
        ],
        dim=1,
    )


def head_input_jacobian(losses: Tensor, head_inputs: Sequence[Optional[Tensor]], output: Tensor) -> Tensor:
    """The K × N Jacobian of ``losses`` w.r.t. the shared backbone ``output``, from one plain backward.

    ``head_inputs[k]`` is the view of ``output`` that task k's head (and only it) reads, or None for a
    task without a head call this step. Since ``L_k`` depends on ``output`` only through its own view,
    ``∂L_k/∂output`` is the gradient of ``Σ_j L_j`` w.r.t. that view: no batched backward is needed.
    """
    used = [(k, view) for k, view in enumerate(head_inputs) if view is not None]
    grads = torch.autograd.grad(losses.sum(), [view for _, view in used], retain_graph=True, allow_unused=True)
    jacobian = losses.new_zeros((losses.shape[0], output.numel()))
    for (k, _), grad in zip(used, grads):
        if grad is not None:
            jacobian[k] = grad.reshape(-1).to(jacobian.dtype)
    return jacobian


def global_gramian(
    jacobian: Tensor,
    mode: GradientMode,
    world_size: int,
    all_reduce: Callable[[Tensor, str], Tensor],
) -> tuple[Tensor, Tensor]:
    """The Gramian of the global batch's task gradients, and the Jacobian it came from.

    ``all_reduce(tensor, op)`` reduces over the ranks with ``op`` in ``{"mean", "sum"}``. In parameter
    mode the returned Jacobian is the global one (the same on every rank); in representation mode it is
    the local one (its columns are this rank's representation entries).
    """
    if world_size <= 1:
        return jacobian @ jacobian.T, jacobian
    if mode == "parameters":
        jacobian = all_reduce(jacobian, "mean")
        return jacobian @ jacobian.T, jacobian
    return all_reduce(jacobian @ jacobian.T, "sum") / world_size**2, jacobian


def flat_dot(direction: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    """``Σ_i <direction_i, input_i>`` with ``direction`` split like :func:`task_jacobian`'s columns.

    Back-propagating it puts exactly ``direction`` (detached) into the inputs' gradients: the surrogate
    through which a non-weighting method's direction reaches Lightning's own backward.
    """
    total = direction.new_zeros(())
    offset = 0
    for x in inputs:
        n = x.numel()
        total = total + (direction[offset : offset + n].detach().reshape(x.shape).to(x.dtype) * x).sum()
        offset += n
    return total
