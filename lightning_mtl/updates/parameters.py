"""Parameter mode: the exact task gradients of the shared parameters, balanced, reaching them through a surrogate."""

from __future__ import annotations

from typing import ClassVar, Optional

from torch import Tensor

from lightning_mtl.gradients import GradientMode, TaskJacobian, output_cotangents, parameter_jacobian, surrogate
from lightning_mtl.gramian import LayerRecorder, OutputJacobian, layerwise_gramian, use_layerwise
from lightning_mtl.step import StepContext
from lightning_mtl.updates.base import Tap
from lightning_mtl.updates.gradient import GradientPath


class ParameterJacobianPath(GradientPath):
    """``gradients="parameters"`` with a gradient-level balancer.

    One backward of ``Σ_k L_k`` through the heads (which read detached features) gives every task's
    cotangent at the backbone output and the heads' own plain gradients. Then, by what the balancer needs:

    - a Gramian weighting, in one process, with at least
      :data:`~lightning_mtl.gramian.LAYERWISE_MIN_ENTRIES` Jacobian entries (K × P), or fewer where it is
      estimated to be faster (:func:`~lightning_mtl.gramian.use_layerwise`): the K × K Gramian is
      formed layer by layer (:mod:`lightning_mtl.gramian`; the forward records the linear layers'
      inputs), never the K × P Jacobian, and the balanced direction is ``Σ_k w_k ∂L_k/∂output`` at the
      backbone output: Lightning's own backward takes it through the backbone (one weighted backward,
      ``Jᵀw`` in the shared parameters);
    - otherwise (a method that needs the gradients themselves, DDP, a small model): one batched backward
      through the backbone gives the task Jacobian of the shared parameters (see
      :mod:`lightning_mtl.gradients`), reduced across DDP ranks and handed to the balancer; the direction
      (``Jᵀ w`` or the method's own) goes to the shared parameters.

    The returned loss has the value ``Σ_k L_k`` and the gradient of a surrogate that puts the direction
    into the backbone output or the shared parameters, and each head's plain gradient into the head.
    Lightning's own backward then runs as usual, so AMP loss scaling, gradient clipping, accumulation
    (and DDP gradient sync) all apply.
    """

    mode: ClassVar[GradientMode] = "parameters"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.recorder = LayerRecorder()

    def tap(self, context: StepContext) -> Tap:
        params = self._shared()
        if self.balancer.needs == "gramian" and context.world_size == 1 and params:
            self.recorder.start(params)  # the linear layers' calls: the layerwise Gramian, if chosen in combine
        return Tap(captured={})

    def end_step(self) -> None:
        self.recorder.stop()  # the global forward hook must not outlive a step that ended before combine

    def _shared(self) -> list[Tensor]:
        return [p for p in self.parameter_lists()[0] if p.requires_grad]

    def combine(
        self, tap: Tap, losses: Tensor, present: Tensor, context: StepContext, empty: bool = False
    ) -> Optional[Tensor]:
        calls = self.recorder.stop()  # None: the materialised Jacobian
        single = context.world_size == 1
        # In one process the loss check joins the Gramian's host read (one sync instead of two).
        if not single and not self.nonfinite.losses_finite(losses.sum(), losses, context):
            return None
        total = losses.sum()
        params = self._shared()
        all_params = self.parameter_lists()[1]
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
        if calls is not None and use_layerwise(calls, len(self.task_names), params):
            jacobian = OutputJacobian(features, cotangents, layerwise_gramian(calls, features, cotangents, params))
        else:
            factors = self.log_loss_factors(losses, present, context)
            if factors is not None:
                cotangents = [c * factors.view(-1, *([1] * (c.ndim - 1))).to(c.dtype) for c in cotangents]
            jacobian = TaskJacobian(params, parameter_jacobian(features, cotangents, params))
        balanced = self.balance(jacobian, losses, present, context, total if single else None)
        if balanced is None:
            return None
        directions, weights = balanced
        if scale != 1.0:  # the surrogate's gradient is scaled by Lightning's backward
            directions = [d / scale for d in directions]
        # Jᵀw from TaskJacobian.combine, or a direction method's output that is new (fresh_direction): pieces of one
        # new tensor, which the gradients may adopt without a copy; other directions and the heads' gradients (which
        # autograd may hand over as views of one element) are copied
        adopt = len(directions) if weights is not None or self.balancer.fresh_direction else 0
        return total.detach() + surrogate([*directions, *head_grads], [*jacobian.inputs, *head_params], adopt)
