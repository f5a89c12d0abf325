"""The interface every balancer implements, and the contract between a balancer and ``MultiTaskModule``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from lightning_mtl.balancers._utils import all_present, all_true, at_least_float32, at_least_float32_dtype, scalarize
from lightning_mtl.gradients import row_products


def _identity(tensor: Tensor) -> Tensor:
    return tensor


class Balancer(nn.Module):
    """Combines the tasks of a training step into the one update that Lightning applies.

    A balancer is an ``nn.Module`` so that its learned parameters and its state (buffers, extra state)
    move with the model and are saved in the checkpoint; it never knows about the ``Trainer``.
    ``MultiTaskModule`` calls :meth:`setup` once with the task registry. What it calls every step
    depends on the class attribute :attr:`needs`:

    ``"losses"`` (loss level, this class)
        ``forward(losses, present) -> (loss, weights)``. ``losses`` has one entry per task in registry
        order; a task without labelled data in the step has ``present[k] = False`` and a zero loss, and
        gets weight 0. ``loss`` is the scalar to back-propagate (with its graph, including to any
        learned parameter of the balancer, which the module's optimizer trains); ``weights`` are the
        detached effective weights ``∂loss/∂L_k``, for logging.
    ``"gramian"`` (:class:`GramianBalancer`)
        the method is a weighting of the Gramian ``G Gᵀ`` of the task-gradient matrix ``G`` (K × P).
        The module computes the Gramian (of parameter or representation gradients, summed over DDP
        ranks), calls ``weights(gramian, losses)`` and back-propagates ``(w.detach() * losses).sum()``.
        ``balancer(G)`` is the plain callable: the combined direction ``Gᵀ w``.
    ``"gradients"`` (:class:`GradientBalancer`)
        the method needs the gradients themselves (it is not a Gramian weighting). ``balancer(G)``
        returns the direction (length P); the module back-propagates a surrogate whose gradient
        equals it. If :attr:`log_losses` is true, ``G`` holds the gradients of ``log(L_k + log_eps)``.

    Hooks the module calls on every balancer (no-ops here):

    - :meth:`after_optimizer_step` after each optimizer step, only when
      :attr:`needs_losses_after_step` is true, with the same batch's task losses recomputed (under
      ``no_grad``) after the update (FAMO);
    - when :attr:`needs_meta_batches` is true (Auto-Lambda), ``meta_step(task_losses, parameters, train_batch,
      meta_batch, lr, loss_scale)`` before the training step of every optimizer step for which
      ``meta_step_due(global_step)`` holds, with a held-out batch drawn from the data module's
      ``meta_dataloader()`` at position ``meta_batches`` (an ``int`` the balancer keeps in its state and
      advances), and the module's forward as ``task_losses`` (see :class:`~lightning_mtl.balancers.AutoLambda`);
    - :meth:`on_train_epoch_end` at the end of each training epoch (DWA);
    - :meth:`reset` to forget all state (a new run with the same object).

    Distributed training: the module sets :attr:`all_reduce_mean` (``Tensor -> Tensor``, the mean
    over ranks; identity by default). A method whose *state* depends on loss values reduces them
    with it first, so every rank keeps the same state (DDP would otherwise overwrite buffers with
    rank 0's). Random methods draw from their own ``torch.Generator``, seeded by their ``seed``
    argument and saved in the checkpoint, so every rank draws the same numbers and a resumed run
    continues the same stream.

    ``Task.weight`` (``task_weights``) is used by :class:`~lightning_mtl.balancers.Static` only; the
    other methods set the weights themselves.
    """

    #: What the module must provide: ``"losses"``, ``"gramian"`` or ``"gradients"`` (see above).
    needs: ClassVar[str] = "losses"
    #: Whether the module must call :meth:`after_optimizer_step` with the losses after the update.
    needs_losses_after_step: ClassVar[bool] = False
    #: Whether the module must call ``meta_step`` with held-out batches before training steps (Auto-Lambda).
    needs_meta_batches: ClassVar[bool] = False
    #: Loss level: whether ``forward`` updates state (DWA's loss history, FAMO's pre-step losses, RLW's
    #: generator). The module then checks the losses for NaN/inf *before* calling it, so that a step
    #: skipped by ``nonfinite_loss="skip"`` leaves that state untouched (one more host read per step).
    forward_changes_state: ClassVar[bool] = False
    #: ``"gradients"`` methods only: the rows of ``G`` are gradients of ``log(L_k + log_eps)``.
    log_losses: ClassVar[bool] = False
    log_eps: ClassVar[float] = 1e-8
    #: Whether the method may run on representation gradients (``gradients="representation"``). A method
    #: that keeps gradient state across steps (DB-MTL's moving average) cannot: the representation
    #: entries belong to different samples at every step.
    supports_representation: ClassVar[bool] = True
    #: Whether the method still means something when every step holds one task (``round_robin``,
    #: ``proportional``, ``temperature``, ``sequential`` sampling): true when the weight it gives a task
    #: does not depend on the other tasks of the step (a fixed weight, a learned per-task scale, a
    #: task's own loss history), so that a step split into one step per task gives every task the same
    #: weight. A method that compares the tasks of a step gets one task to compare: its weight is then a
    #: constant and the run is plain per-task training, so the module refuses it at fit start.
    supports_one_task_per_step: ClassVar[bool] = False

    task_names: list[str]

    def __init__(self) -> None:
        super().__init__()
        self.task_names = []
        #: Mean over the processes of a distributed run; ``MultiTaskModule`` replaces the identity.
        self.all_reduce_mean: Callable[[Tensor], Tensor] = _identity

    def setup(self, task_names: Sequence[str], task_weights: Optional[Sequence[float]] = None) -> None:
        """Receive the task registry (``task_weights`` default to 1); called once by ``MultiTaskModule``."""
        self.task_names = list(task_names)
        weights = [1.0] * len(self.task_names) if task_weights is None else list(task_weights)
        if len(weights) != len(self.task_names):
            raise ValueError(f"task_weights has {len(weights)} entries for {len(self.task_names)} tasks")
        self.register_buffer("task_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def distributed(self) -> bool:
        """Whether the module runs it in a multi-process run (it has set :attr:`all_reduce_mean`)."""
        return self.all_reduce_mean is not _identity

    def forward(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def after_optimizer_step(self, losses: Tensor) -> None:
        """Receive the step's task losses recomputed after the optimizer step (if ``needs_losses_after_step``)."""

    def on_train_epoch_end(self) -> None:
        """Called by the module at the end of every training epoch."""

    def reset(self) -> None:
        """Forget all state gathered during training (no-op for stateless methods)."""

    def _require_setup(self, losses: Tensor) -> None:
        if losses.shape != (self.num_tasks,):
            raise RuntimeError(
                f"{type(self).__name__} got losses of shape {tuple(losses.shape)} after setup with "
                f"{self.num_tasks} task(s); call setup(task_names) first, with one name per task"
            )

    def _reduced_losses(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """Per-task mean loss over the ranks where the task is present, and whether any rank has it.

        One collective: sums and counts are reduced together, so a task absent on some ranks is
        averaged over the others only. In a single process (the default identity) it is
        ``(losses, present)``, returned without the reduction's small ops.
        """
        if self.all_reduce_mean is _identity:
            return losses.detach(), present
        mask = present.to(losses.dtype)
        reduced = self.all_reduce_mean(torch.stack([losses.detach() * mask, mask]))
        total, count = reduced[0], reduced[1]
        seen = count > 0
        return torch.where(seen, total / count.clamp_min(torch.finfo(count.dtype).tiny), 0.0), seen


class NonlinearScalarization(Balancer):
    """A loss-level method whose loss is a nonlinear function ``f`` of the task losses (GLS, STCH).

    Subclasses implement :meth:`_scalarize` (``(value, weights ∂f/∂L_k)`` on the losses, absent tasks
    masked). In one process ``forward`` is that. Under DDP, ``f`` applied to each process's own losses
    would give each process other weights, and the averaged gradient would not be that of ``f`` on the
    global batch: each process instead takes the weights at the losses averaged over the processes
    (each task's over those that have it, :meth:`Balancer._reduced_losses`) and back-propagates
    ``Σ_k w_k L_k``, whose gradients DDP averages into ``Σ_k w_k ∇L_k`` of the global batch.
    """

    def forward(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        if not self.distributed:
            return self._scalarize(losses, present)
        mean, seen = self._reduced_losses(losses, present)
        _, weights = self._scalarize(mean, seen)
        weights = torch.where(present, weights.detach(), 0.0).to(losses.dtype)
        return weights @ losses, weights

    def _scalarize(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        """``(loss, weights ∂loss/∂L_k)`` for ``losses`` (``present`` marks the tasks with a loss)."""
        raise NotImplementedError


def check_nonzero(nonzero: Optional[Sequence[bool]], gramian: Tensor) -> None:
    """Raise ``ValueError`` unless ``nonzero`` (a ``weights`` argument) is None or has one entry per task."""
    if nonzero is not None and len(nonzero) != gramian.shape[0]:
        raise ValueError(f"nonzero has {len(nonzero)} entries for a {gramian.shape[0]} x {gramian.shape[0]} gramian")


def check_gradient_matrix(G: Tensor) -> None:
    """Raise ``ValueError`` unless ``G`` is a K × P matrix of task gradients (a direction method's input)."""
    if G.ndim != 2:
        raise ValueError(f"G must be a K x P matrix of task gradients, got shape {tuple(G.shape)}")


def nonzero_rows(G: Tensor) -> Tensor:
    """Which rows of the K × P ``G`` are not all zero (a zero row: a task absent from the step), as a bool K-vector.

    ``max_j g_kj != 0 or min_j g_kj != 0``, not ``(G != 0).any(dim=1)``: the same answer (a NaN row counts as
    present, ``-0.0`` as zero) from two reductions that read ``G`` once each and write no K × P temporary: on a
    contiguous 10 × 525k Jacobian on CPU 0.53 ms, against 4.19 ms for the boolean and 2.59 ms for ``|G|``'s
    maximum (``benchmarks/wide_products.py``). A strided floating ``G`` (where the reductions along rows are slow)
    takes ``|G|``'s maximum, a strided integer or bool ``G`` the boolean.
    """
    if G.shape[1] == 0:  # amax refuses an empty reduction; no coordinate: no task present
        return torch.zeros(G.shape[0], dtype=torch.bool, device=G.device)
    if G.is_contiguous():
        return (G.amax(dim=1) != 0) | (G.amin(dim=1) != 0)
    if G.is_floating_point():
        return G.abs().amax(dim=1) != 0
    return (G != 0).any(dim=1)  # integers (abs of the most negative one overflows) and bool (no abs)


class GramianBalancer(Balancer):
    """A gradient-level method that is a weighting of the Gramian: ``d = Gᵀ w`` with ``w = f(G Gᵀ)``.

    Subclasses implement :meth:`_weights` on the Gramian of the *present* tasks. Tasks whose gradient
    is zero (absent from the step, whose rows and columns the module leaves at zero, or exactly
    solved) are left out of the weighting and get weight 0: the method then acts as if only the other
    tasks existed, and never divides by a zero norm. This needs the present tasks on the host, one
    small synchronisation per step, like the solvers these methods run.
    """

    needs: ClassVar[str] = "gramian"
    _every_task_mask: Optional[Tensor] = None

    def weights(
        self,
        gramian: Tensor,
        losses: Optional[Tensor] = None,
        present: Optional[Tensor] = None,
        nonzero: Optional[Sequence[bool]] = None,
        entries: Optional[Sequence[float]] = None,
    ) -> Tensor:
        """The K task weights from the K × K Gramian (``losses`` and ``present`` are used by GradNorm only).

        ``present`` marks the tasks with a loss on *this* process (the Gramian is global under DDP).
        ``nonzero`` says which tasks have a nonzero gradient (``gramian[k, k] > 0``) when the caller has
        already read the diagonal on the host (``MultiTaskModule`` reads the Gramian once per step for
        its finiteness check); left out, it is read here, one device synchronisation. ``entries``, the
        Gramian's K² entries row by row as Python floats, may be given by a caller that has read them
        (the module does): a two-task method with a closed form (:meth:`_pair_weights`) then reads nothing.

        A half-precision Gramian is weighted in float32, and the weights are float32.

        The weighting runs on the CPU whatever the Gramian's device: a K × K problem is a few dozen tiny
        operations, loops and active-set solves (the methods' own float64 NumPy code, ``_qp.py``) that an
        accelerator would run as one kernel launch and often one synchronisation each. A Gramian on
        an accelerator is copied to the host once (K² numbers) and the K weights are copied back.
        """
        if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1]:
            raise ValueError(f"gramian must be a square matrix, got shape {tuple(gramian.shape)}")
        device = gramian.device
        check_nonzero(nonzero, gramian)
        if gramian.shape[0] == 2 and _has_closed_pair(type(self)):
            a, b, b_transposed, c = gramian.reshape(-1).tolist() if entries is None else entries
            if a > 0 and c > 0 and (nonzero is None or all(nonzero)):
                dtype = at_least_float32_dtype(gramian.dtype)
                if b != b_transposed:  # a float32 product's rounding (not the CPU's row_products, which is symmetric)
                    b = 0.5 * b + 0.5 * b_transposed
                pair = self._pair_weights(a, b, c, dtype)
                if pair is not None:
                    weights = torch.tensor(pair, dtype=dtype)
                    return weights if device.type == "cpu" else weights.to(device, non_blocking=True)
        gramian = at_least_float32(gramian)
        if not gramian.is_cpu:  # each torch call costs a microsecond or two: the common step makes few
            gramian = gramian.cpu()
        if nonzero is None:
            diagonal = (gramian.detach() if gramian.requires_grad else gramian).numpy().diagonal()
            nonzero = [value > 0 for value in diagonal.tolist()]
        if all(nonzero):
            self._every_task_mask = all_true(self._every_task_mask, len(nonzero), gramian.device)
            weights = self._weights(gramian, self._every_task_mask)
            if weights.dtype != gramian.dtype:  # ``float()`` costs less than ``to(float32)``
                weights = weights.float() if gramian.dtype == torch.float32 else weights.to(gramian.dtype)
        else:
            weights = gramian.new_zeros(gramian.shape[0])
            if any(nonzero):
                index = torch.tensor([k for k, has in enumerate(nonzero) if has])
                mask = torch.tensor(list(nonzero), dtype=torch.bool)
                weights[index] = self._weights(gramian[index][:, index], mask).to(weights.dtype)
        return weights if device.type == "cpu" else weights.to(device, non_blocking=True)

    def forward(self, G: Tensor, losses: Optional[Tensor] = None) -> Tensor:  # type: ignore[override]
        """The combined direction ``Gᵀ w`` for the K × P task-gradient matrix ``G``."""
        check_gradient_matrix(G)
        work = at_least_float32(G)
        return (self.weights(row_products(work), losses) @ work).to(G.dtype)

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:  # pragma: no cover - interface
        """Weights for ``gramian``, the Gramian of the tasks ``present`` (a mask over all K tasks)."""
        raise NotImplementedError

    def _pair_weights(self, a: float, b: float, c: float, dtype: torch.dtype) -> Optional[tuple[float, float]]:
        """Two tasks, both with a nonzero gradient: the weights for the Gramian ``[[a, b], [b, c]]`` (``a, c > 0``) in
        Python floats, or None to use :meth:`_weights`; a subclass with a closed form overrides it. ``dtype`` is the
        Gramian's (float32 for a half-precision one), for a method whose rank decisions depend on its rounding.

        Its answer must be :meth:`_weights`' (tested to 1e-12 on the same symmetric Gramians, state included; a
        Gramian whose off-diagonal entries differ by rounding is given their mean, where :meth:`_weights` may read
        either, which matters only where the method is that ill-conditioned, e.g. CAGrad on nearly opposite gradients
        of equal norm). It is used only when the class that defines it also defines, or inherits, the
        :meth:`_weights` in use: a subclass that overrides :meth:`_weights` alone (a user's variant of MGDA) keeps its
        own weights at K = 2 too. The reason is cost: inside a training step every NumPy or torch call runs with cold
        caches after the backward's large products (10–40 µs each where a tight loop measures 1–3), and a two-task
        weighting in NumPy made 5–15 of them (0.1–0.2 ms of a 5 ms W-MLP step); the closed form in floats makes one,
        the weights' tensor.
        """
        return None


@functools.cache
def _has_closed_pair(cls: type) -> bool:
    """Whether ``cls`` takes :meth:`GramianBalancer._pair_weights` at K = 2: a class on its MRO defines it and is a
    subclass of the one that defines the ``_weights`` in use (so a subclass overriding ``_weights`` alone does not)."""
    pair_owner = next(owner for owner in cls.__mro__ if "_pair_weights" in owner.__dict__)
    weights_owner = next(owner for owner in cls.__mro__ if "_weights" in owner.__dict__)
    return pair_owner is not GramianBalancer and issubclass(pair_owner, weights_owner)


class GradientBalancer(Balancer):
    """A gradient-level method that needs the task gradients themselves, not only their Gramian."""

    needs: ClassVar[str] = "gradients"
    #: True when :meth:`forward` always returns a new tensor that shares memory with nothing else (not its input, not
    #: the balancer's state): parameter mode then hands its pieces to the shared parameters' ``.grad`` without a copy,
    #: and clipping and accumulation modify them in place. False (a copy each step) unless a subclass guarantees it.
    fresh_direction: ClassVar[bool] = False

    def forward(self, G: Tensor) -> Tensor:  # type: ignore[override]  # pragma: no cover - interface
        """The combined direction (length P) for the K × P task-gradient matrix ``G``."""
        raise NotImplementedError


class MaskedScalarizer(Balancer):
    """A loss-level method wrapping a torchjd scalarizer with one learned parameter per task (UW, IMTL-L).

    One ``scalarizer_class(K)`` over the K losses holds the parameters (one K-vector each: one tensor
    for the optimizer to update and one scalarizer call per step, whatever K). A task absent from the
    step (``present[k]`` false) is evaluated at a zero loss and at the neutral parameter value 0, where
    its term is 0 (checked at :meth:`setup`); ``torch.where`` selects those constants, so the absent
    task's term, weight and parameter gradient are all exactly 0: its regulariser (UW's ``½ s_k``)
    does not pull its parameter while it has no data. The scalarizer's own ``forward`` computes the
    loss, with its graph (the model and the parameters get torchjd's gradient), run with the masked
    parameters through ``torch.func.functional_call``; in a step where every task is present (see
    :func:`~lightning_mtl.balancers._utils.all_present`) the scalarizer is simply called.

    The returned weights ``∂loss/∂L_k`` come from :meth:`_weights` when a subclass gives them in
    closed form (a separate ``autograd.grad`` costs a few percent of a small model's step), else
    from autograd (:func:`~lightning_mtl.balancers._utils.scalarize`). Subclasses set
    :attr:`scalarizer_class`.
    """

    scalarizer_class: ClassVar[Callable[[int], nn.Module]]

    def setup(self, task_names: Sequence[str], task_weights: Optional[Sequence[float]] = None) -> None:
        super().setup(task_names, task_weights)
        k = self.num_tasks
        self.scalarizer = self.scalarizer_class(k)
        self._parameter_names = [name for name, _ in self.scalarizer.named_parameters()]
        zeros = {}
        for name, parameter in self.scalarizer.named_parameters():
            if parameter.shape != (k,):
                raise TypeError(f"{type(self).__name__}: parameter {name!r} of shape {tuple(parameter.shape)} is not per task")
            zeros[name] = torch.zeros_like(parameter)
        with torch.no_grad():
            neutral = torch.func.functional_call(self.scalarizer, zeros, (torch.zeros(k),))
        if neutral.item() != 0:  # the masking below relies on it
            raise TypeError(f"{type(self).__name__}: the scalarizer's term is not 0 at a zero loss and zero parameters")

    def _weights(self, parameters: dict[str, Tensor]) -> Optional[Tensor]:
        """The weights ``∂loss/∂L_k`` in closed form from the (detached) parameters, or ``None`` for autograd."""
        return None

    def forward(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        self._require_setup(losses)
        scalarizer = self.scalarizer
        every = all_present(present)
        if every:  # the common step: the scalarizer itself, with its own parameters
            parameters = {name: getattr(scalarizer, name) for name in self._parameter_names}
        else:
            parameters = {name: torch.where(present, getattr(scalarizer, name), 0.0) for name in self._parameter_names}
        weights = self._weights({name: parameter.detach() for name, parameter in parameters.items()})
        if weights is None:

            def objective(values: Tensor) -> Tensor:
                if every:
                    return scalarizer(values)
                return torch.func.functional_call(scalarizer, parameters, (torch.where(present, values, 0.0),))

            return scalarize(objective, losses)
        if every:
            return scalarizer(losses), weights.to(losses.dtype)
        value = torch.func.functional_call(scalarizer, parameters, (torch.where(present, losses, 0.0),))
        return value, torch.where(present, weights, 0.0).to(losses.dtype)

    def reset(self) -> None:
        self.scalarizer.reset()
