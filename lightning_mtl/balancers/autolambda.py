"""Auto-Lambda: task weights learned by a one-step lookahead on held-out losses (Liu, James, Davison & Johns, 2022)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, NamedTuple, Optional

import torch
from torch import Tensor

from lightning_mtl.balancers._utils import PrivateAdam, all_present, at_least_float32, check_range
from lightning_mtl.balancers.base import Balancer

#: ``batch -> (losses (K,), present (K,))``: the task losses of a batch at the parameters' current values, with
#: their graph (``MultiTaskModule`` gives its forward; a test gives a tiny model's).
TaskLosses = Callable[[Any], tuple[Tensor, Tensor]]


class MetaGradient(NamedTuple):
    """The meta-gradient ``∂/∂λ Σ_{k ∈ primary} L_k^meta(θ')`` (K,) and the tasks it is defined for (``seen``: the
    tasks with a training loss on some process; the others' entries are 0 and their weights stay as they are)."""

    gradient: Tensor
    seen: Tensor


class AutoLambda(Balancer):
    """Auto-λ, from `Auto-Lambda: Disentangling Dynamic Task Relationships <https://arxiv.org/abs/2202.03091>`_
    (Liu, James, Davison & Johns, TMLR 2022).

    The loss is ``Σ_k λ_k L_k`` with task weights ``λ`` learned so that a training step helps the *primary* tasks on
    held-out data. Before a training step (every ``update_every`` optimizer steps) the module calls
    :meth:`meta_step` with the step's training batch and a held-out *meta* batch (``MultiTaskDataModule(meta=...)``):

    1. the virtual step ``θ' = θ − α ∇_θ Σ_k λ_k L_k^train(θ)``, plain gradient descent with ``α`` the model
       optimizer's learning rate (``virtual_lr`` to set it) on a copy of the parameters: the real optimizer's
       state (momentum, Adam moments) and ``.grad`` are not touched;
    2. ``v = ∇_{θ'} Σ_{k ∈ P} L_k^meta(θ')``, the gradient of the primary tasks' meta loss (unweighted) at ``θ'``;
    3. the paper's finite-difference approximation of the meta-gradient
       ``∇_λ L^meta(θ') = −α ∇²_{λ,θ} L^train(θ, λ) v ≈ −α [∇_λ L^train(θ⁺, λ) − ∇_λ L^train(θ⁻, λ)] / (2ε)``
       with ``θ± = θ ± ε v`` and ``ε = epsilon / ‖v‖`` (``epsilon = 0.01``, as in the paper after DARTS). Since
       ``∂L^train/∂λ_k = L_k^train``, that is ``−α (L_k^train(θ⁺) − L_k^train(θ⁻)) / (2ε)``: two forwards
       without a graph;
    4. one Adam step on ``λ`` (lr ``lr``), the parameters put back exactly as they were.

    Settings. The paper updates ``λ`` at every step with Adam; ``initial_weight=0.1`` and ``lr=1e-4`` are the values
    recalled from the paper's experiments (its full text could not be re-read when this was written; the defaults
    were fixed before any run of this implementation). Left open by the paper and chosen here: ``λ`` is not
    constrained (``min_weight`` floors it after each step if set); the paper's stochastic task sampling (a random
    subset of tasks per meta step, for many tasks) is not implemented. See ``docs/balancers.md``, *Auto-Lambda*.

    In the module: the meta step runs in ``on_train_batch_start`` (before the training step, outside DDP's
    forward), once per optimizer step (at the first micro-batch of an accumulation window, on that micro-batch),
    with the global RNG as it found it and the model's buffers (BatchNorm statistics) put back: it changes ``λ``
    only. Under DDP the two parameter gradients are averaged over the processes (those of the global batch) and so
    are the losses at ``θ±``, so ``λ`` stays identical on every process. ``λ``, its Adam state and the number of
    meta batches drawn (the meta stream's position) are in the checkpoint. A loss-level method: the ``gradients``
    mode is ignored (the lookahead is over all parameters).

    Args:
        primary_tasks: the tasks whose meta loss ``λ`` optimises (auxiliary learning: the others only help); default
            every task. Checked against the task registry at :meth:`setup`.
        initial_weight: the initial ``λ_k`` of every task.
        lr: learning rate of ``λ``'s Adam.
        update_every: a meta step every this many optimizer steps (the paper: 1).
        virtual_lr: ``α`` of the virtual step; ``None``: the model optimizer's current learning rate (its first
            parameter group's).
        epsilon: ``ε‖v‖``, the length of the finite-difference step in parameter space.
        min_weight: if set, ``λ`` is floored at it after each meta step (None: unconstrained, as in the paper).
    """

    needs_meta_batches: ClassVar[bool] = True
    #: λ_k does not depend on the other tasks of a step; with one task per step only that task's λ gets a meta-gradient.
    supports_one_task_per_step: ClassVar[bool] = True

    def __init__(
        self,
        primary_tasks: Optional[list[str]] = None,
        initial_weight: float = 0.1,
        lr: float = 1e-4,
        update_every: int = 1,
        virtual_lr: Optional[float] = None,
        epsilon: float = 0.01,
        min_weight: Optional[float] = None,
    ) -> None:
        super().__init__()
        if primary_tasks is not None:
            if isinstance(primary_tasks, str) or not all(isinstance(name, str) for name in primary_tasks):
                raise ValueError(f"primary_tasks must be a list of task names, got {primary_tasks!r}")
            if not primary_tasks or len(set(primary_tasks)) != len(primary_tasks):
                raise ValueError(f"primary_tasks must name at least one task, each once; got {list(primary_tasks)}")
        self.primary_tasks = None if primary_tasks is None else list(primary_tasks)
        self.initial_weight = check_range("initial_weight", initial_weight, -math.inf)
        self.lr = check_range("lr", lr, 0.0, open_low=True)
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be a positive int, got {update_every!r}")
        self.update_every = update_every
        self.virtual_lr = None if virtual_lr is None else check_range("virtual_lr", virtual_lr, 0.0, open_low=True)
        self.epsilon = check_range("epsilon", epsilon, 0.0, open_low=True)
        self.min_weight = None if min_weight is None else check_range("min_weight", min_weight, -math.inf)
        self._adam = PrivateAdam(lr=self.lr)
        #: meta batches drawn so far: the meta stream's position (saved with the state)
        self.meta_batches = 0

    def setup(self, task_names: Sequence[str], task_weights: Optional[Sequence[float]] = None) -> None:
        super().setup(task_names, task_weights)
        primary = self.task_names if self.primary_tasks is None else self.primary_tasks
        unknown = [name for name in primary if name not in self.task_names]
        if unknown:
            raise ValueError(
                f"AutoLambda(primary_tasks=...) names {unknown[0]!r}, which is not a task; the tasks are {self.task_names}"
            )
        self.register_buffer("lambdas", torch.full((self.num_tasks,), self.initial_weight))
        mask = torch.tensor([name in primary for name in self.task_names])
        self.register_buffer("primary", mask, persistent=False)

    def check_meta_tasks(self, meta_tasks: Sequence[str]) -> None:
        """Refuse a meta split of per-task data holding none of the primary tasks: ``λ`` would never move."""
        primary = [name for name, is_primary in zip(self.task_names, self.primary.tolist()) if is_primary]
        if not any(name in meta_tasks for name in primary):
            raise ValueError(
                f"the meta split holds the tasks {list(meta_tasks)} and none of the primary tasks {primary}: AutoLambda "
                "learns λ from the primary tasks' loss on meta batches, so λ would never change. Give the primary "
                "tasks data in MultiTaskDataModule(meta=...), or set AutoLambda(primary_tasks=...)."
            )

    def forward(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        self._require_setup(losses)
        weights = self.lambdas.to(losses)
        if not all_present(present):
            weights = torch.where(present, weights, 0.0)
        return weights @ losses, weights

    def meta_step_due(self, global_step: int) -> bool:
        """Whether the optimizer step ``global_step`` (0-based) starts with a meta step."""
        return global_step % self.update_every == 0

    def meta_step(
        self,
        task_losses: TaskLosses,
        parameters: Sequence[Tensor],
        train_batch: Any,
        meta_batch: Any,
        lr: float,
        loss_scale: float = 1.0,
    ) -> Optional[MetaGradient]:
        """Update ``λ`` from one training batch and one meta batch (see the class docstring); counts the meta batch.

        ``lr`` is the model optimizer's learning rate (``α``, unless ``virtual_lr`` is set). Returns the
        meta-gradient, or None when it is not finite or the primary tasks' meta loss has no gradient (no primary
        task in the meta batch): ``λ`` is then left as it was.
        """
        self.meta_batches += 1
        result = self.meta_gradient(task_losses, parameters, train_batch, meta_batch, lr, loss_scale)
        if result is None:
            return None
        gradient, seen = result
        kept = self.lambdas.clone()
        self._adam.step(self.lambdas, gradient)
        if not all_present(seen):  # a task without training loss keeps its weight (and Adam does not move it)
            self.lambdas.copy_(torch.where(seen, self.lambdas, kept))
        if self.min_weight is not None:
            self.lambdas.clamp_(min=self.min_weight)
        return result

    def meta_gradient(
        self,
        task_losses: TaskLosses,
        parameters: Sequence[Tensor],
        train_batch: Any,
        meta_batch: Any,
        lr: float,
        loss_scale: float = 1.0,
    ) -> Optional[MetaGradient]:
        """The finite-difference meta-gradient (steps 1–3 of the class docstring); the parameters are put back
        bit for bit. Under ``16-mixed`` the backward passes run on losses times ``loss_scale`` (then unscaled)."""
        if not self.task_names:
            raise RuntimeError("AutoLambda.meta_gradient before setup(task_names): call setup first")
        params = [p for p in parameters if p.requires_grad]
        alpha = lr if self.virtual_lr is None else self.virtual_lr
        saved = [p.detach().clone() for p in params]
        device = params[0].device if params else torch.device("cpu")
        try:
            with _same_randomness(device) as rewind, torch.enable_grad():
                losses, present = task_losses(train_batch)
                losses = at_least_float32(losses)
                weights = torch.where(present, self.lambdas.to(losses), 0.0)
                g = self._mean_gradient(weights @ losses, params, loss_scale)
                with torch.no_grad():
                    torch._foreach_add_(params, g, alpha=-alpha)  # θ' = θ − α g
                rewind()
                meta, meta_present = task_losses(meta_batch)
                objective = torch.where(self.primary & meta_present, at_least_float32(meta), 0.0).sum()
                v = self._mean_gradient(objective, params, loss_scale)
                norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(v)))) if v else 0.0
                if not (math.isfinite(norm) and norm > 0.0):
                    return None
                step = self.epsilon / norm
                shifted = []
                with torch.no_grad(), torch.autocast(device.type, enabled=False):
                    for sign in (1.0, -1.0):  # θ± = θ ± ε v; full precision: a small difference of two losses
                        torch._foreach_copy_(params, saved)
                        torch._foreach_add_(params, v, alpha=sign * step)
                        rewind()
                        shifted.append(at_least_float32(task_losses(train_batch)[0]))
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
        difference, seen = self._mean_difference(shifted[0], shifted[1], present)
        gradient = -alpha * difference / (2.0 * step)
        if not bool(torch.isfinite(gradient).all()):
            return None
        return MetaGradient(gradient.to(self.lambdas.dtype), seen)

    def _mean_gradient(self, value: Tensor, params: list[Tensor], loss_scale: float) -> list[Tensor]:
        """``∇ value`` w.r.t. ``params`` (zeros where it does not depend on one), averaged over the processes.

        Under ``16-mixed`` the backward runs on ``value`` times the GradScaler's scale; an overflow is retried at a
        16× lower scale (down to 1): the meta objective is unweighted, so its gradient may overflow at a scale at
        which the real step's ``Σ λ_k L_k`` does not, and the GradScaler, which only sees the real step, would
        never lower it."""
        scale = loss_scale
        while True:
            retry = scale > 1.0
            if value.requires_grad and params:
                grads = torch.autograd.grad(value * scale if scale != 1.0 else value, params, allow_unused=True,
                                            materialize_grads=True, retain_graph=retry)  # fmt: skip
                grads = [grad / scale for grad in grads] if scale != 1.0 else list(grads)
            else:  # no task of this process's batch has a label: it still joins the reduction
                grads = [torch.zeros_like(p) for p in params]
            grads = self._reduced(grads)
            if not retry or not grads or bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()):
                return grads
            scale = max(scale / 16.0, 1.0)

    def _reduced(self, grads: list[Tensor]) -> list[Tensor]:
        """The gradients averaged over the processes (one all-reduce)."""
        if not self.distributed or not grads:
            return grads
        flat = self.all_reduce_mean(torch.cat([grad.reshape(-1) for grad in grads]))
        return [part.view_as(grad) for part, grad in zip(flat.split([grad.numel() for grad in grads]), grads)]

    def _mean_difference(self, plus: Tensor, minus: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """``L⁺ − L⁻`` per task, each averaged over the processes that have the task, and whether any has it."""
        if not self.distributed:
            return torch.where(present, plus - minus, 0.0), present
        mask = present.to(plus.dtype)
        total, count = self.all_reduce_mean(torch.stack([(plus - minus) * mask, mask])).unbind()
        seen = count > 0
        return torch.where(seen, total / count.clamp_min(torch.finfo(count.dtype).tiny), 0.0), seen

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "AutoLambda":
        """Moved and cast like any module, except that ``λ`` stays at least float32 (``16-true``, ``bf16-true``):
        an Adam step of ``lr = 1e-4`` is below half a bf16 ulp of ``λ ≈ 0.1``, so a bf16 ``λ`` would never move."""
        super()._apply(fn, recurse)
        if "lambdas" in self._buffers:
            self.lambdas = at_least_float32(self.lambdas)
        return self

    def reset(self) -> None:
        self.lambdas.fill_(self.initial_weight)
        self._adam.reset()
        self.meta_batches = 0

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": self._adam.state_dict(), "meta_batches": self.meta_batches}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._adam.load_state_dict(state["optimizer"])
        self.meta_batches = int(state["meta_batches"])


@contextmanager
def _same_randomness(device: torch.device) -> Iterator[Callable[[], None]]:
    """Run a block whose forwards all draw the same random numbers (dropout masks): ``rewind()`` puts the CPU (and the
    CUDA device's) generator back to where the block started; at its end both are as they were before it."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state(device) if devices else None

        def rewind() -> None:
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, device)

        yield rewind
