"""What one training step of a :class:`~lightning_mtl.MultiTaskModule` did, for callbacks: :class:`StepView`.

After every training step's backward the module holds the step's record; ``module.last_step`` reads
it as a :class:`StepView`: the task losses, the effective task weights and, when per-task gradients
were formed, the K × K Gramian of the global batch's task gradients. Reading it costs nothing when
nobody asks (the tensors are the step's own, detached); a callback that wants the Gramian on a step
whose balancer works on losses alone calls ``module.request_gramian()`` before that step (for
example in ``on_train_batch_start``), and pays for the per-task gradients on that step only.

:class:`StepContext` is internal: what a balancing path needs to know about the run (processes,
loss scale, accumulation) for one step, read once by the module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from torch import Tensor


@dataclass(frozen=True)
class StepView:
    """One training step as the balancer saw it (read-only; tensors are detached, on the model's device).

    Attributes:
        global_step: ``trainer.global_step`` when the step ran (micro-batches of one accumulation
            window share it).
        batch_idx: the batch index Lightning passed to ``training_step``.
        task_names: the tasks, in registry order: the order of every vector below.
        losses: the task losses of this process's batch, float32, shape ``(K,)``; 0 for a task without a
            labelled sample in it.
        present: bool ``(K,)``, which tasks had a labelled sample in this process's batch.
        weights: the effective task weights ``(K,)`` the update used (for a loss-level method
            ``∂loss/∂L_k``; for a Gramian weighting its ``w``), or None when the method has no weights
            (a direction method: GradDrop, DB-MTL) or a gradient-level step had nothing shared to balance
            (a frozen backbone, in either gradient mode).
        gramian: the K × K Gramian ``G Gᵀ`` of the global batch's task gradients (of the shared
            parameters with ``gradients="parameters"``, of the backbone output with
            ``"representation"``), in the units of the task losses (unscaled under ``16-mixed``, not
            divided by ``accumulate_grad_batches``), identical on every process; for a method on log-losses
            (DB-MTL) the Gramian of the gradients of ``log(L_k + eps)``, which it balances. None when the step
            formed no per-task gradients (a loss-level balancer without ``request_gramian()``, a frozen
            backbone).
        skipped: the step was skipped by ``nonfinite_loss="skip"`` (its weights are None). A step that
            the ``16-mixed`` GradScaler skips later, in the optimizer step, is not marked.
    """

    global_step: int
    batch_idx: int
    task_names: tuple[str, ...]
    losses: Tensor
    present: Tensor
    weights: Optional[Tensor]
    gramian: Optional[Tensor]
    skipped: bool = False


@dataclass
class StepRecord:
    """The module's mutable record of the step in progress; a representation-mode backward completes it."""

    global_step: int
    batch_idx: int
    task_names: tuple[str, ...]
    losses: Optional[Tensor] = None
    present: Optional[Tensor] = None
    weights: Optional[Tensor] = None
    gramian: Optional[Tensor] = None
    skipped: bool = False

    def view(self) -> Optional[StepView]:
        if self.losses is None or self.present is None:
            return None
        weights = None if self.skipped or self.weights is None else self.weights.detach()
        gramian = None if self.gramian is None else self.gramian.detach()
        return StepView(
            self.global_step, self.batch_idx, self.task_names, self.losses.detach(), self.present, weights, gramian, self.skipped
        )


@dataclass
class StepContext:
    """What the balancing paths need to know about the run for one step (read once by the module)."""

    batch_idx: int
    global_step: int
    world_size: int
    rank: int
    all_reduce: Callable[[Tensor, str], Tensor]
    #: ``tensor -> (world_size, *tensor.shape)``: every process's tensor
    all_gather: Callable[[Tensor], Tensor]
    record: StepRecord
    #: drops every gradient at the next optimizer step (a skip found in a representation-mode backward)
    skip_optimizer_step: Callable[[], None]
    #: the GradScaler's scale under ``16-mixed``, else 1.0
    loss_scale: float = 1.0
    #: Lightning divides the loss by ``accumulate_grad_batches`` before its backward
    accumulation: int = 1
    #: a callback asked for this step's Gramian (``MultiTaskModule.request_gramian``)
    wants_gramian: bool = False
