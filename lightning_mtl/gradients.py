"""Per-task gradients of the shared part of a multi-task model, and their reduction across DDP ranks.

``gradients="parameters"``
    the heads read *detached* copies of the backbone output (one leaf per task), so
    back-propagating ``Σ_k L_k`` through the heads stops at the backbone output and gives, in one
    plain backward, every task's cotangent ``∂L_k/∂output`` (:func:`output_cotangents`). The exact
    Jacobian ``J`` (K × P) of the task losses w.r.t. the shared parameters follows: the K
    cotangents go back through the *backbone only*, in one batched vector-Jacobian product
    (``torch.autograd.grad(..., is_grads_batched=True)``), with a loop fallback for modules without a
    batching rule (e.g. cuDNN RNNs). :func:`parameter_jacobian`. Reentrant activation checkpointing
    (``torch.utils.checkpoint(..., use_reentrant=True)``) supports neither: it is refused with a
    clear error (``use_reentrant=False`` works).
``gradients="representation"``
    the Jacobian w.r.t. the backbone output itself (MGDA-UB, Sener & Koltun 2018): the cotangents
    are its rows. Here the balancing happens *inside* Lightning's backward (:func:`task_views`):
    each head reads its own identity view of the output, so the backward hands the view node the K
    cotangents, which it replaces by the balanced direction before the backbone's backward continues.
    No second backward, no surrogate: the step costs one backward plus the K × K weighting.

A Gramian weighting in one process on a large enough model (K × P ≥
:data:`lightning_mtl.gramian.LAYERWISE_MIN_ENTRIES`) never needs ``J``: :mod:`lightning_mtl.gramian`
forms the Gramian layer by layer from the same cotangents, and the update ``Jᵀ w`` is one weighted
backward of ``Σ_k w_k ∂L_k/∂output``. What follows is the materialised path, used by the methods that
need the gradients themselves, under DDP and for small models.

In parameter mode the Jacobian is kept as column blocks (:class:`TaskJacobian`): the Gramian
``J Jᵀ`` is the sum of the blocks' Gramians and the combined direction ``Jᵀ w`` is formed block by block, so the K × P
matrix is never concatenated unless a method needs it whole or DDP must reduce it. The direction
reaches the shared inputs through :func:`surrogate`, a zero-valued term whose gradient
is exactly ``d``: the backbone is not back-propagated a second time.

Under DDP the balancer must see the task gradients of the *global* batch. In parameter mode that is
the mean of the ranks' Jacobians, so ``J`` itself is all-reduced (a K × P message) before the Gramian
is formed — averaging per-rank Gramians or per-rank balancer outputs would not be exact. In
representation mode each rank's columns are its own samples, so the global Gramian is the sum of the
local ones divided by ``world_size²`` (the global loss is the mean of the ranks' losses): a K × K
message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Optional

import torch
from torch import Tensor

GradientMode = Literal["parameters", "representation"]
GRADIENT_MODES = ("parameters", "representation")

#: Parameters with fewer entries than this share one Jacobian block (one matmul instead of many tiny ones).
_SMALL_BLOCK = 1 << 14


#: Column chunk of :func:`row_products`: above four chunks, the product is summed chunk by chunk.
PRODUCT_CHUNK = 1 << 13


def row_products(a: Tensor, b: Optional[Tensor] = None) -> Tensor:
    """``a @ bᵀ`` for K × W matrices with W ≫ K (``b`` defaults to ``a``: the K × K Gramian of ``a``'s rows).

    One ``mm`` with a K × K output and an inner dimension of W runs badly on CPU BLAS: on a 10 × 525k
    float32 Jacobian it took 4.05 ms with a relative error of 2.6e-5 (one long accumulation); the sum of the
    products of :data:`PRODUCT_CHUNK`-column chunks, one ``bmm``, took 2.35 ms with 1.3e-7
    (``benchmarks/wide_products.py``; ``benchmarks/RESULTS.md``, "Gramians of wide matrices"). Chunked for float32
    and float64 above four chunks; up to 32 768 columns (W-MLP's representation) one ``mm`` is one operation
    instead of six, with a relative error of up to 1.0e-6 against 1.6e-7 chunked (K = 2, 20 seeds, 2026-12-02). A
    half-precision product is one ``mm`` (chunk products rounded to half precision before their sum would be less
    accurate than it).
    """
    b = a if b is None else b
    k, width = a.shape
    # half precision: each chunk's product would be rounded to it before the sum (one mm rounds once); no rows: mm
    if width <= 4 * PRODUCT_CHUNK or a.dtype not in (torch.float32, torch.float64) or k == 0 or b.shape[0] == 0:
        return a @ b.T
    chunks = width // PRODUCT_CHUNK
    whole = chunks * PRODUCT_CHUNK
    a_chunks = a[:, :whole].reshape(k, chunks, PRODUCT_CHUNK).transpose(0, 1)
    b_chunks = a_chunks if b is a else b[:, :whole].reshape(b.shape[0], chunks, PRODUCT_CHUNK).transpose(0, 1)
    product = torch.bmm(a_chunks, b_chunks.transpose(1, 2)).sum(dim=0)
    if whole < width:
        product += a[:, whole:] @ b[:, whole:].T
    return product


def output_cotangents(
    total: Tensor, captured: Sequence[Optional[tuple[Tensor, Tensor]]], params: Sequence[Tensor] = ()
) -> tuple[list[Tensor], list[Tensor], list[tuple[Tensor, Tensor]]]:
    """One backward of ``total = Σ_j L_j`` through the heads: the task cotangents at the backbone output.

    ``captured[k]`` is ``(output, leaf)`` for task k: the backbone output its head read and the
    detached leaf it actually read (None for a task without a head call). Since only ``L_k`` depends
    on leaf k, the gradient there is ``∂L_k/∂output``. Returns the distinct outputs the heads read,
    for each its cotangent stack of shape ``(K, *output.shape)`` (zero rows for the tasks that do not
    read it), and ``(parameter, gradient)`` for the ``params`` that the heads' graph reaches (the heads'
    and loss modules' own parameters): their plain gradients, from the same backward.
    """
    num_tasks = len(captured)
    used = [(k, pair) for k, pair in enumerate(captured) if pair is not None]
    leaves = [leaf for _, (_, leaf) in used]
    if total.requires_grad:
        grads = torch.autograd.grad(total, [*leaves, *params], allow_unused=True)
    else:  # no task has a loss (a DDP process without labels this step): zero cotangents
        grads = (None,) * (len(leaves) + len(params))
    reached = [(p, g) for p, g in zip(params, grads[len(leaves) :]) if g is not None]
    shared = used[0][1][0] if used else None
    every_task_reads_it = len(used) == num_tasks and all(pair[0] is shared for _, pair in used)
    if every_task_reads_it and all(g is not None for g in grads[:num_tasks]):
        return [shared], [torch.stack(grads[:num_tasks])], reached  # the usual case: every head reads one output
    outputs: list[Tensor] = []
    cotangents: list[Tensor] = []
    position: dict[int, int] = {}
    for (k, (output, _)), grad in zip(used, grads):
        i = position.get(id(output))
        if i is None:
            i = position[id(output)] = len(outputs)
            outputs.append(output)
            cotangents.append(output.new_zeros((num_tasks, *output.shape)))
        if grad is not None:
            cotangents[i][k] = grad
    return outputs, cotangents, reached


_REENTRANT = (
    "gradients='parameters' cannot form per-task gradients through reentrant activation checkpointing "
    "(torch.utils.checkpoint(..., use_reentrant=True) hides the checkpointed parameters from autograd.grad): "
    "use torch.utils.checkpoint(..., use_reentrant=False), or gradients='representation'"
)


def parameter_jacobian(outputs: Sequence[Tensor], cotangents: Sequence[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
    """``∂L_k/∂θ`` for every parameter, shape ``(K, *θ.shape)``: the cotangents back through the backbone.

    One batched backward over the K task cotangents; one backward per task for modules that cannot
    be batched. Parameters a task does not reach get zero rows.
    """
    num_tasks = cotangents[0].shape[0]
    try:
        grads = torch.autograd.grad(
            outputs, params, cotangents, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except RuntimeError:  # an operation without a batching rule: one backward pass per task
        try:
            rows = [
                torch.autograd.grad(outputs, params, [c[k] for c in cotangents], retain_graph=True, allow_unused=True)
                for k in range(num_tasks)
            ]
        except RuntimeError as error:
            if "use_reentrant" in str(error):
                raise ValueError(_REENTRANT) from error
            raise
        grads = tuple(
            torch.stack([row[i] if row[i] is not None else torch.zeros_like(p) for row in rows])
            if any(row[i] is not None for row in rows)
            else None
            for i, p in enumerate(params)
        )
    if grads and all(g is None for g in grads) and any(output.requires_grad for output in outputs):
        # the outputs depend on the graph but on none of the parameters: a reentrant checkpoint hides them
        raise ValueError(_REENTRANT)
    return [g if g is not None else p.new_zeros((num_tasks, *p.shape)) for g, p in zip(grads, params)]


class TaskJacobian:
    """The K × N Jacobian of the task losses w.r.t. a list of ``inputs``, kept as column blocks.

    ``blocks[i]`` (K × n) covers the consecutive inputs ``groups[i]``, flattened in order; consecutive
    small inputs share a block.
    """

    def __init__(self, inputs: Sequence[Tensor], rows: Sequence[Tensor]) -> None:
        """``rows[j]`` is ``(K, *inputs[j].shape)``: every task's gradient of input j."""
        self.inputs = list(inputs)
        self.blocks: list[Tensor] = []
        self.groups: list[list[Tensor]] = []
        #: two tasks' gradients of one input kept apart, flattened (:meth:`of_task_cotangents`); else None
        self.pair: Optional[tuple[Tensor, Tensor]] = None
        if len(self.inputs) == 1:  # the usual representation-mode case: one block, no grouping
            self._add([(self.inputs[0], rows[0])])
            return
        pending: list[tuple[Tensor, Tensor]] = []
        for x, row in zip(self.inputs, rows):
            if x.numel() < _SMALL_BLOCK:
                pending.append((x, row))
                continue
            self._add(pending)
            pending = []
            self._add([(x, row)])
        self._add(pending)

    def _add(self, items: list[tuple[Tensor, Tensor]]) -> None:
        if not items:
            return
        flat = [row.reshape(row.shape[0], -1) for _, row in items]
        block = flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)
        if block.dtype in (torch.float16, torch.bfloat16):  # balance in float32
            block = block.float()
        self.blocks.append(block)
        self.groups.append([x for x, _ in items])

    @classmethod
    def of_task_cotangents(
        cls, cotangents: Sequence[Sequence[Tensor]], buffers: Optional[dict] = None
    ) -> TaskJacobian:
        """The Jacobian w.r.t. a list of outputs from ``cotangents[j][k]``, task k's cotangent of output j.

        Two tasks' cotangents of one output on the CPU are kept as they are (:attr:`pair`), without a 2 × N stack,
        when they are float32 or float64, at most ``4 * PRODUCT_CHUNK`` wide (where :func:`row_products` is one
        ``mm``) and not under ``create_graph``: the Gramian is then three dot products read as floats
        (:meth:`pair_entries`) and the combination two operations. Inside a step each tensor operation costs
        10–40 µs with cold caches whatever its size; this saves the stack, the ``mm``, the Gramian's read and
        about 60 µs of Python, half of the fixed cost of representation mode at K = 2 (``benchmarks/RESULTS.md``).
        The dots are also more accurate than the ``mm`` at these widths (relative 1.5e-7 against 7.4e-7 at 32 768
        columns). Otherwise every output's cotangents are stacked, into ``buffers`` (:func:`_stack`) if given.
        """
        if len(cotangents) == 1 and len(cotangents[0]) == 2 and not torch.is_grad_enabled():
            first, second = cotangents[0]
            if (
                first.device.type == "cpu"  # on an accelerator each dot's read would be a synchronisation
                and first.dtype in (torch.float32, torch.float64)
                and second.dtype == first.dtype
                and first.numel() <= 4 * PRODUCT_CHUNK
            ):
                jacobian = cls([], [])
                jacobian.inputs, jacobian.pair = [first], (first.reshape(-1), second.reshape(-1))
                return jacobian
        stacks = [_stack(rows, buffers, j) for j, rows in enumerate(cotangents)]
        return cls([stack[0] for stack in stacks], stacks)

    def pair_entries(self) -> Optional[list[float]]:
        """The 2 × 2 Gramian's entries row by row as floats from three dot products, for a :attr:`pair`; else None."""
        if self.pair is None:
            return None
        first, second = self.pair
        off_diagonal = torch.dot(first, second).item()
        return [torch.dot(first, first).item(), off_diagonal, off_diagonal, torch.dot(second, second).item()]

    def scale_rows(self, factors: Tensor) -> None:
        """Multiply task k's gradient by ``factors[k]`` (in place of the stored rows, not of the cotangents).

        The rows are float32 or float64 (half-precision cotangents were widened to float32 in the blocks): until
        2026-12-02 a log-loss method's factors multiplied the bfloat16/float16 cotangents, rounding the products to
        them (found by review: up to 0.75 of a bfloat16 ulp). Parameter mode still scales its cotangents before its
        Jacobian is formed, in their dtype."""
        if self.pair is not None:
            first, second = factors.tolist()
            self.pair = (self.pair[0] * first, self.pair[1] * second)
            return
        self.blocks = [block * factors.to(block.dtype).unsqueeze(1) for block in self.blocks]

    def gramian(self) -> Tensor:
        if self.pair is not None:
            return torch.tensor(self.pair_entries(), dtype=self.pair[0].dtype).view(2, 2)
        gramian = row_products(self.blocks[0])
        for block in self.blocks[1:]:
            gramian = gramian + row_products(block)
        return gramian

    def flat(self) -> Tensor:
        """The whole K × N matrix (columns in input order)."""
        if self.pair is not None:
            return torch.stack(self.pair)
        return self.blocks[0] if len(self.blocks) == 1 else torch.cat(self.blocks, dim=1)

    def all_reduce_mean(self, all_reduce: Callable[[Tensor, str], Tensor]) -> None:
        """Replace the Jacobian with its mean over the ranks (one message)."""
        self.blocks, self.pair = [all_reduce(self.flat(), "mean")], None
        self.groups = [[x for group in self.groups for x in group]]

    def split(self, direction: Tensor) -> list[Tensor]:
        """A length-N direction cut into pieces shaped like the inputs."""
        pieces = torch.split(direction, [x.numel() for x in self.inputs])
        return [piece.view(x.shape) for piece, x in zip(pieces, self.inputs)]

    def combine(self, weights: Tensor) -> list[Tensor]:
        """``Jᵀ w``, block by block, as pieces shaped like the inputs."""
        if self.pair is not None:  # two operations on the rows as they came (w is float32, the rows float32 or 64)
            first, second = weights.tolist()
            return [self.pair[0].mul(first).add_(self.pair[1], alpha=second).view(self.inputs[0].shape)]
        pieces: list[Tensor] = []
        for block, group in zip(self.blocks, self.groups):
            flat = (weights if weights.dtype == block.dtype else weights.to(block.dtype)) @ block
            if len(group) == 1:
                pieces.append(flat.view(group[0].shape))
            else:
                pieces.extend(p.view(x.shape) for p, x in zip(torch.split(flat, [x.numel() for x in group]), group))
        return pieces


def global_gramian(
    jacobian: TaskJacobian,
    mode: GradientMode,
    world_size: int,
    all_reduce: Callable[[Tensor, str], Tensor],
) -> Tensor:
    """The Gramian of the global batch's task gradients.

    ``all_reduce(tensor, op)`` reduces over the ranks with ``op`` in ``{"mean", "sum"}``. In parameter
    mode the Jacobian is replaced in place by the global one (the same on every rank); in
    representation mode it stays the local one (its columns are this rank's representation entries).
    """
    if world_size <= 1:
        return jacobian.gramian()
    if mode == "parameters":
        jacobian.all_reduce_mean(all_reduce)
        return jacobian.gramian()
    return all_reduce(jacobian.gramian(), "sum") / world_size**2


class _Surrogate(torch.autograd.Function):
    """A zero scalar whose backward hands each input its given direction (times the incoming gradient)."""

    @staticmethod
    def forward(ctx: Any, directions: Sequence[Tensor], adopt: int, *inputs: Tensor) -> Tensor:
        ctx.directions, ctx.adopt = directions, adopt
        ctx.dtypes = [x.dtype for x in inputs]
        return torch.zeros((), device=inputs[0].device)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:
        directions, ctx.directions = ctx.directions, None  # released: AccumulateGrad may adopt them without a copy
        if directions is None:
            raise RuntimeError(
                "the balanced step's surrogate was back-propagated twice; lightning-mtl's training step supports one "
                "backward per training_step loss (do not call backward(retain_graph=True) on it more than once)"
            )
        # grad_output is 1, or 1 / accumulate_grad_batches and/or the GradScaler's scale under 16-mixed: the direction
        # is scaled like any gradient (on an accelerator without reading it back: no host sync)
        adopt = ctx.adopt if grad_output.device.type == "cpu" and grad_output.item() == 1.0 else 0
        return (
            None,
            None,
            *(d.to(dtype) if i < adopt else (d * grad_output).to(dtype) for i, (d, dtype) in enumerate(zip(directions, ctx.dtypes))),
        )


def surrogate(directions: Sequence[Tensor], inputs: Sequence[Tensor], adopt: int = 0) -> Tensor:
    """A zero-valued scalar whose gradient w.r.t. ``inputs[i]`` is exactly ``directions[i]`` (detached).

    Through it the balanced direction (and the heads' plain gradients) reach Lightning's own
    backward, so DDP gradient sync, AMP loss scaling, clipping and accumulation apply to them like to
    any gradient. An input listed twice receives the sum of its directions. (One autograd node: its
    forward computes nothing; its backward hands each input its direction times the incoming gradient.)

    The first ``adopt`` directions are handed over as they are when the incoming gradient is 1 on the CPU: the
    parameters' ``.grad`` then *is* that memory, with no copy. Only for directions that share memory with nothing
    else (not with each other, an input, or any state kept after the step), such as the pieces of a
    ``TaskJacobian.combine``: clipping and accumulation modify ``.grad`` in place. The others are always copied
    (autograd can hand several heads' plain gradients over as views of one element). The directions are released
    by the backward: the graph supports one backward.
    """
    pieces = [d.detach().reshape(x.shape) for d, x in zip(directions, inputs)]
    return _Surrogate.apply(pieces, adopt, *inputs)


class _TaskViews(torch.autograd.Function):
    """Identity forward with one view of every output per task; the backward balances the task cotangents."""

    @staticmethod
    def forward(
        ctx: Any, num_tasks: int, balance: Callable[[TaskJacobian], list[Tensor]], buffers: Optional[dict], *outputs: Tensor
    ) -> tuple[Tensor, ...]:
        ctx.num_tasks, ctx.balance, ctx.buffers = num_tasks, balance, buffers
        return tuple(output.view_as(output) for output in outputs for _ in range(num_tasks))

    @staticmethod
    def backward(ctx: Any, *cotangents: Tensor) -> tuple[Optional[Tensor], ...]:
        k = ctx.num_tasks
        by_output = [cotangents[i : i + k] for i in range(0, len(cotangents), k)]
        return (None, None, None, *ctx.balance(TaskJacobian.of_task_cotangents(by_output, ctx.buffers)))


def _stack(rows: Sequence[Tensor], buffers: Optional[dict], index: int) -> Tensor:
    """``torch.stack(rows)``, written into a buffer kept across steps (``buffers[index]``) when one is given.

    The K × (output size) stack is the largest tensor of a representation-mode step (5 MB at K = 40 on W-MLP). A
    fresh one each step measured up to 8× slower to fill once a process had run several such models (page faults
    into newly mapped memory, `benchmarks/RESULTS.md`); a kept buffer is filled in place. It is consumed within the
    backward (the Gramian and the directions are new tensors). Not under ``create_graph``: then a plain stack.
    """
    if buffers is None or torch.is_grad_enabled():
        return torch.stack(rows)
    first = rows[0]
    shape = (len(rows), *first.shape)
    buffer = buffers.get(index)
    if buffer is None or buffer.shape != shape or buffer.dtype != first.dtype or buffer.device != first.device:
        buffer = buffers[index] = torch.empty(shape, dtype=first.dtype, device=first.device)
    return torch.stack(list(rows), out=buffer)


def task_views(
    outputs: Sequence[Tensor],
    num_tasks: int,
    balance: Callable[[TaskJacobian], list[Tensor]],
    buffers: Optional[dict] = None,
) -> list[list[Tensor]]:
    """``views[j][k]``: task k's view of ``outputs[j]`` (representation mode), balanced in the backward.

    The views equal the outputs. When the backward reaches them it calls ``balance(jacobian)`` once, with
    the :class:`TaskJacobian` of every task's cotangent of the outputs (:meth:`TaskJacobian.of_task_cotangents`;
    zero rows for a task whose loss does not reach them), and continues into the backbone with the returned
    directions (one per output) instead of the cotangents' sum. Everything Lightning does around the
    backward (DDP gradient sync, AMP loss scaling, clipping, accumulation) sees these directions as
    the backbone's gradient.
    """
    flat = _TaskViews.apply(num_tasks, balance, buffers, *outputs)
    return [list(flat[j * num_tasks : (j + 1) * num_tasks]) for j in range(len(outputs))]
