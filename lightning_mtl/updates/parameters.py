"""Parameter mode: the exact task Jacobian of the shared parameters, balanced, reaching them through a surrogate."""

from __future__ import annotations

from typing import ClassVar, Optional

from torch import Tensor

from lightning_mtl.gradients import GradientMode, TaskJacobian, output_cotangents, parameter_jacobian, surrogate
from lightning_mtl.step import StepContext
from lightning_mtl.updates.base import Tap
from lightning_mtl.updates.gradient import GradientPath


class ParameterJacobianPath(GradientPath):
    """``gradients="parameters"`` with a gradient-level balancer.

    One backward of ``Σ_k L_k`` through the heads (which read detached features) gives every task's
    cotangent at the backbone output and the heads' own plain gradients; one batched backward through
    the backbone turns the cotangents into the task Jacobian of the shared parameters (see
    :mod:`lightning_mtl.gradients`). The Jacobian is reduced across DDP ranks and handed to the
    balancer. The returned loss has the value ``Σ_k L_k`` and the gradient of a surrogate that puts the
    balanced direction (``Jᵀ w`` for a Gramian weighting, the method's own direction otherwise) into
    the shared parameters and each head's plain gradient into the head. Lightning's own backward then
    runs as usual, so DDP gradient sync, AMP loss scaling, gradient clipping and accumulation all apply.
    """

    mode: ClassVar[GradientMode] = "parameters"

    def tap(self, context: StepContext) -> Tap:
        return Tap(captured={})

    def combine(
        self, tap: Tap, losses: Tensor, present: Tensor, context: StepContext, empty: bool = False
    ) -> Optional[Tensor]:
        single = context.world_size == 1
        # In one process the loss check joins the Gramian's host read (one sync instead of two).
        if not single and not self.nonfinite.losses_finite(losses.sum(), losses, context):
            return None
        total = losses.sum()
        backbone_params, all_params = self.parameter_lists()
        params = [p for p in backbone_params if p.requires_grad]
        if not tap.captured or not params:  # a frozen backbone (e.g. SequentialTransfer): nothing shared to balance
            if single and not self.nonfinite.losses_finite(total, losses, context):
                return None
            return total
        scale = context.loss_scale
        features, cotangents, plain = output_cotangents(
            total * scale if scale != 1.0 else total,
            [tap.captured.get(name) for name in self.task_names],
            [p for p in all_params if p.requires_grad],
        )
        # the heads' (and loss modules') plain gradients, through the same surrogate as the direction
        head_params = [p for p, _ in plain]
        head_grads = [g / scale if scale != 1.0 else g for _, g in plain]
        cotangents = self.log_loss_cotangents(cotangents, losses, present, context)
        jacobian = TaskJacobian(params, parameter_jacobian(features, cotangents, params))
        balanced = self.balance(jacobian, losses, present, context, total if single else None)
        if balanced is None:
            return None
        directions, _ = balanced
        if scale != 1.0:  # the surrogate's gradient is scaled by Lightning's backward
            directions = [d / scale for d in directions]
        return total.detach() + surrogate([*directions, *head_grads], [*jacobian.inputs, *head_params])
