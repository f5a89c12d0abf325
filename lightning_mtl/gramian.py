"""The Gramian ``J Jᵀ`` of the task Jacobian of the shared parameters, layer by layer, without forming ``J`` (K × P).

A Gramian weighting (UPGrad, MGDA, ...) needs only the K × K Gramian of the task gradients and then
one weighted backward. The Gramian is a sum over parameters, so it can be formed one layer at a time:

- a **linear layer** (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``): its block comes from its input rows and
  its K output cotangents (:mod:`lightning_mtl.gramian_blocks`: kernel or explicit form). The inputs are
  recorded by a module forward hook (:class:`LayerRecorder`); the cotangents arrive, all K at once, in
  **one batched backward** of the task cotangents through the backbone that computes no parameter
  gradient: a hook on each layer's output node turns them into the layer's block and drops them, so only
  one layer's are held at a time.
- every **other shared parameter** (LayerNorm, BatchNorm, embeddings, recurrent layers, a raw
  ``nn.Parameter``, a linear layer whose weight is also used elsewhere) gets its K rows explicitly from a
  batched backward, a few parameters at a time (:data:`FALLBACK_SHARE` of the shared parameters, or one
  parameter if larger), freed after its block is added. The common case, a few norm layers, costs nothing
  extra: their rows come from the same backward.

A weight used outside its module's recorded calls (weight tying, a functional call) would make the
kernel form wrong: one walk of the backward graph per step finds such uses, and those modules go to the
fallback. Everything is exact: the tests compare with the materialised Jacobian.

The batched backward is PyTorch's own (``torch.autograd.grad(..., is_grads_batched=True)`` runs the same
legacy ``vmap`` over the autograd engine); it is run here directly so that the layer hooks can read the
K cotangents as one tensor. Modules without a batching rule take one backward per task (exact, and the
layers' cotangents are then held for all layers at once). :func:`use_layerwise` decides, per step,
whether this path is taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node
from torch.nn.modules.module import register_module_forward_hook

from lightning_mtl import gramian_blocks
from lightning_mtl.gradients import _REENTRANT, row_products
from lightning_mtl.gramian_blocks import block_cost, has_kernel_rule, input_width, layer_gramian, trainable_parameters

#: When a Gramian weighting in one process forms the Gramian layer by layer (:func:`use_layerwise`): ``"auto"``
#: (from :data:`LAYERWISE_MIN_ENTRIES` on, or when estimated to cost fewer operations), ``"always"``, or
#: ``"never"`` (the materialised K × P Jacobian).
LAYERWISE = "auto"
#: From this many Jacobian entries K × P on (64 MB in float32), ``"auto"`` always forms it layer by layer.
LAYERWISE_MIN_ENTRIES = 1 << 24
#: Fallback parameters whose rows are formed in one backward: up to this share of the shared parameters
#: (or :data:`~lightning_mtl.gramian_blocks.WORKSPACE` rows' entries, if more).
FALLBACK_SHARE = 1 / 8


@dataclass
class LayerCall:
    """One call of a linear layer in the forward: its input and its output's autograd node."""

    module: nn.Module
    input: Tensor
    version: int
    node: Node
    output_nr: int
    output_shape: torch.Size
    output_dtype: torch.dtype


def _rows(call: LayerCall) -> int:
    """The call's output rows N: every sample (and, for a convolution, every position)."""
    shape = call.output_shape
    if isinstance(call.module, nn.Linear):
        return shape.numel() // shape[-1]
    batched = len(shape) == (3 if isinstance(call.module, nn.Conv1d) else 4)
    return shape.numel() // shape[1 if batched else 0]


def use_layerwise(calls: Sequence[LayerCall], num_tasks: int, params: Sequence[Tensor]) -> bool:
    """Whether to form the Gramian layer by layer: always from :data:`LAYERWISE_MIN_ENTRIES` Jacobian entries on;
    below, if the recorded linear layers' blocks plus the weighted backward (their weight and input gradients)
    are estimated to cost fewer operations than their K batched weight gradients and Gramian (materialised).
    :data:`LAYERWISE` ``"always"`` / ``"never"`` overrides the choice."""
    if LAYERWISE != "auto":
        return LAYERWISE == "always"
    if num_tasks * sum(p.numel() for p in params) >= LAYERWISE_MIN_ENTRIES:
        return True
    k, saving = num_tasks, 0
    layers: dict[nn.Module, list[int]] = {}
    for call in calls:
        rows = layers.setdefault(call.module, [0, 0])
        rows[0] += _rows(call)
        rows[1] = max(rows[1], int(call.input.requires_grad))
    for module, (n, input_grad) in layers.items():
        if module.weight.requires_grad:
            fan_in, fan_out = input_width(module), module.weight.shape[0]
            materialised = k * fan_in * fan_out * (n + k)
            saving += materialised - block_cost(n, fan_in, fan_out, k) - (1 + input_grad) * n * fan_in * fan_out
    return saving > 0


class LayerRecorder:
    """Records the calls of linear layers holding shared parameters during one forward (a global module hook).

    :meth:`start` before the forward, :meth:`stop` after it; between them every module call in the
    process passes the hook, which keeps ``(input, output node)`` of the ``nn.Linear``/``nn.Conv1d``/
    ``nn.Conv2d`` calls whose trainable weight or bias is one of ``params``.
    """

    def __init__(self) -> None:
        self.calls: list[LayerCall] = []
        self._ids: set[int] = set()
        self._handle: Any = None

    def start(self, params: Sequence[Tensor]) -> None:
        self.stop()
        self._ids = {id(p) for p in params}
        self._handle = register_module_forward_hook(self._record)

    def stop(self) -> Optional[list[LayerCall]]:
        """The calls recorded since :meth:`start`, or None if it was not recording."""
        if self._handle is None:
            return None
        self._handle.remove()
        self._handle = None
        calls, self.calls = self.calls, []
        return calls

    def _record(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) or not args or not has_kernel_rule(module):
            return
        if not any(id(p) in self._ids for p in trainable_parameters(module)):
            return
        x = args[0]
        if isinstance(x, Tensor) and isinstance(output, Tensor) and output.grad_fn is not None:
            call = LayerCall(module, x, x._version, output.grad_fn, output.output_nr, output.shape, output.dtype)
            self.calls.append(call)


# ---------------------------------------------------------------------------------------- the whole Gramian


def used_elsewhere(calls: Sequence[LayerCall], outputs: Sequence[Tensor], params: Sequence[Tensor]) -> set[int]:
    """Ids of the ``params`` that the backward graph of ``outputs`` reaches other than through the parameter
    edges of the recorded ``calls`` (a tied weight, a functional use, a call the hook did not see)."""
    ids = {id(p) for p in params}
    stop = {call.node for call in calls}
    stack = [t.grad_fn for t in (*outputs, *(call.input for call in calls)) if t.grad_fn is not None]
    seen: set[Node] = set()
    found: set[int] = set()
    while stack:
        node = stack.pop()
        if node in seen or node in stop:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf
        if variable is not None:
            if id(variable) in ids:
                found.add(id(variable))
            continue
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return found


def kernel_layers(calls: Sequence[LayerCall], outputs: Sequence[Tensor], params: Sequence[Tensor]) -> dict[nn.Module, list[LayerCall]]:
    """The recorded calls by module, for the modules whose trainable parameters all get the kernel rule: shared
    parameters (in ``params``) used nowhere but in those calls."""
    ids = {id(p) for p in params}
    layers: dict[nn.Module, list[LayerCall]] = {}
    for call in calls:
        layers.setdefault(call.module, []).append(call)
    layers = {m: c for m, c in layers.items() if all(id(p) in ids for p in trainable_parameters(m))}
    owners: dict[int, nn.Module] = {}
    for module in layers:
        for p in trainable_parameters(module):
            if owners.setdefault(id(p), module) is not module:  # one parameter in two modules (tied)
                owners[id(p)] = None  # type: ignore[assignment]
    elsewhere = used_elsewhere([c for cs in layers.values() for c in cs], outputs, [p for m in layers for p in trainable_parameters(m)])
    return {
        m: c for m, c in layers.items() if all(owners[id(p)] is m and id(p) not in elsewhere for p in trainable_parameters(m))
    }


class _Accumulator:
    """Adds each layer's block to the Gramian as the backward delivers the layer's cotangents (all its calls')."""

    def __init__(self, layers: dict[nn.Module, list[LayerCall]], num_tasks: int, dtype: torch.dtype) -> None:
        self.layers, self.num_tasks, self.dtype = layers, num_tasks, dtype
        self.batched = True  # False: one backward per task (an operation without a batching rule)
        self.level = 0  # the vmap level of the batched backward in progress
        self.reset()

    def reset(self) -> None:
        self.gramian: Optional[Tensor] = None
        self.received: dict[nn.Module, dict[int, Tensor]] = {m: {} for m in self.layers}
        self.per_task: dict[int, list[Tensor]] = {}  # one task per backward: the cotangents so far, by call

    def add(self, block: Tensor) -> None:
        block = block.to(self.dtype)
        self.gramian = block if self.gramian is None else self.gramian + block

    def hook(self, module: nn.Module, i: int) -> Any:
        call = self.layers[module][i]

        def prehook(grad_outputs: tuple[Optional[Tensor], ...]) -> None:
            if i in self.received.get(module, (i,)):  # delivered already (a later pass runs through the layer)
                return
            grad = grad_outputs[call.output_nr]
            if not self.batched:  # one task's cotangent
                self.per_task.setdefault(id(call), []).append(_zeros(call) if grad is None else grad)
            else:
                self.deliver(module, i, None if grad is None else torch._remove_batch_dim(grad, self.level, self.num_tasks, 0))

        return prehook

    def deliver(self, module: nn.Module, i: int, cotangents: Optional[Tensor]) -> None:
        """Call ``i`` of ``module`` got its K cotangents (None: zero); the module's block once all its calls have."""
        received = self.received.get(module)
        if received is None or i in received:
            return
        received[i] = cotangents
        calls = self.layers[module]
        if len(received) < len(calls):
            return
        del self.received[module]
        pieces = [(call.input, received[j]) for j, call in enumerate(calls) if received[j] is not None]
        for call in calls if module.weight.requires_grad else ():
            if call.input._version != call.version:
                raise RuntimeError(
                    f"the input of a {type(module).__name__} of the backbone was modified in place after the layer read it"
                )
        if pieces:
            self.add(layer_gramian(module, pieces, self.dtype))

    def deliver_per_task(self) -> None:
        """One task per backward: every call whose K cotangents have come, stacked."""
        for module, calls in self.layers.items():
            for i, call in enumerate(calls):
                rows = self.per_task.pop(id(call), None)
                if rows is not None and len(rows) == self.num_tasks and module in self.received:
                    self.deliver(module, i, torch.stack(rows))

    def missing(self) -> list[tuple[nn.Module, int]]:
        return [(m, i) for m, received in self.received.items() for i in range(len(self.layers[m])) if i not in received]


def _zeros(item: Any) -> Tensor:
    if isinstance(item, LayerCall):
        return torch.zeros(item.output_shape, dtype=item.output_dtype, device=item.input.device)
    return torch.zeros_like(item)


def _backward(acc: _Accumulator, outputs: Sequence[Tensor], cotangents: Sequence[Tensor], items: list[Any]) -> list[Optional[Tensor]]:
    """``(K, *item.shape)`` gradients of the task cotangents for ``items`` (parameters, or calls: their outputs),
    None where none reaches; the layer hooks see the K cotangents of every layer on the way."""
    inputs = [GradientEdge(item.node, item.output_nr) if isinstance(item, LayerCall) else item for item in items]
    k = acc.num_tasks
    if acc.batched:  # what torch.autograd.grad(..., is_grads_batched=True) runs, with the level known to the hooks
        acc.level = torch._C._vmapmode_increment_nesting()
        try:
            batched = [torch._add_batch_dim(c, 0, acc.level) for c in cotangents]
            grads = torch.autograd.grad(outputs, inputs, batched, retain_graph=True, allow_unused=True)
            return [None if g is None else torch._remove_batch_dim(g, acc.level, k, 0) for g in grads]
        finally:
            torch._C._vmapmode_decrement_nesting()
    rows = [torch.autograd.grad(outputs, inputs, [c[j] for c in cotangents], retain_graph=True, allow_unused=True) for j in range(k)]
    return [
        None if all(r[i] is None for r in rows) else torch.stack([_zeros(item) if r[i] is None else r[i] for r in rows])
        for i, item in enumerate(items)
    ]


def _fallback_groups(fallback: list[Tensor], cap: float) -> list[list[Tensor]]:
    """Consecutive fallback parameters, up to ``cap`` entries a group (a larger parameter alone)."""
    groups: list[list[Tensor]] = []
    size = cap
    for p in fallback:
        if size + p.numel() > cap:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.numel()
    return groups


def _passes(acc: _Accumulator, outputs: Sequence[Tensor], cotangents: Sequence[Tensor], groups: list[list[Tensor]]) -> bool:
    """The backward passes that give every layer its cotangents and every fallback parameter its rows; whether any
    shared parameter was reached."""
    calls = [(m, i, c) for m, cs in acc.layers.items() for i, c in enumerate(cs)]
    # a layer on the backbone's input: its node would not run (nothing below it is asked for), so its output's
    # gradient is asked for directly
    sources = [(m, i, c) for m, i, c in calls if not c.input.requires_grad]
    reached = bool(calls)
    passes = [([*sources], groups[0] if groups else [])] + [([], group) for group in groups[1:]]
    if not sources and not groups:
        passes = [(calls, [])]
    for number, (layer_items, params) in enumerate(passes):
        grads = _backward(acc, outputs, cotangents, [c for _, _, c in layer_items] + params)
        for (m, i, _), grad in zip(layer_items, grads):
            acc.deliver(m, i, grad)
        for grad in grads[len(layer_items) :]:
            if grad is not None:
                reached = True
                rows = grad.reshape(acc.num_tasks, -1).to(acc.dtype)
                acc.add(row_products(rows))
        if number == 0:
            acc.deliver_per_task()
            missing = [(m, i, acc.layers[m][i]) for m, i in acc.missing()]
            if missing:  # a layer the first backward did not run through (its input needs no gradient of ours)
                for (m, i, _), grad in zip(missing, _backward(acc, outputs, cotangents, [c for _, _, c in missing])):
                    acc.deliver(m, i, grad)
    return reached


def _checked_passes(acc: _Accumulator, outputs: Sequence[Tensor], cotangents: Sequence[Tensor], groups: list[list[Tensor]]) -> bool:
    try:
        return _passes(acc, outputs, cotangents, groups)
    except RuntimeError as error:
        if "use_reentrant" in str(error) or "Checkpointing is not compatible" in str(error):
            raise ValueError(_REENTRANT) from error
        raise


def layerwise_gramian(
    calls: Sequence[LayerCall], outputs: Sequence[Tensor], cotangents: Sequence[Tensor], params: Sequence[Tensor]
) -> Tensor:
    """The K × K Gramian of the Jacobian of ``params`` whose rows are the task cotangents ``cotangents[j]``
    (``(K, *outputs[j].shape)``) back-propagated from ``outputs``: exact, without the K × P Jacobian.

    ``calls`` are the linear-layer calls recorded in the forward (:class:`LayerRecorder`); the graph is kept.
    """
    num_tasks = cotangents[0].shape[0]
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    layers = kernel_layers(calls, outputs, params)
    covered = {id(p) for m in layers for p in trainable_parameters(m)}
    fallback = [p for p in params if id(p) not in covered]
    cap = max(FALLBACK_SHARE * sum(p.numel() for p in params), gramian_blocks.WORKSPACE / num_tasks)
    groups = _fallback_groups(fallback, cap)
    acc = _Accumulator(layers, num_tasks, dtype)
    handles = [
        call.node.register_prehook(acc.hook(m, i)) for m, cs in layers.items() for i, call in enumerate(cs) if call.input.requires_grad
    ]
    try:
        try:
            reached = _checked_passes(acc, outputs, cotangents, groups)
        except (RuntimeError, AttributeError):  # no batching rule, or a torch without the private vmap calls: per task
            acc.reset()
            acc.batched = False
            reached = _checked_passes(acc, outputs, cotangents, groups)
    finally:
        for handle in handles:
            handle.remove()
    if not reached and any(output.requires_grad for output in outputs):
        raise ValueError(_REENTRANT)  # the outputs depend on the graph but on none of the parameters
    gramian = acc.gramian if acc.gramian is not None else cotangents[0].new_zeros(num_tasks, num_tasks, dtype=dtype)
    return (gramian + gramian.T) / 2


class OutputJacobian:
    """The task Jacobian of the shared parameters as the layerwise path knows it: its Gramian, and the task
    cotangents at the backbone outputs, through which ``Jᵀ w`` is one weighted backward of the backbone.

    Has the part of :class:`~lightning_mtl.gradients.TaskJacobian`'s interface that a Gramian weighting uses:
    :meth:`gramian` (:meth:`pair_entries` is None: the Gramian is a tensor already), and :meth:`combine` giving the
    direction at the ``inputs`` (here the backbone outputs).
    """

    def __init__(self, outputs: Sequence[Tensor], cotangents: Sequence[Tensor], gramian: Tensor) -> None:
        self.inputs = list(outputs)
        self.cotangents = list(cotangents)
        self._gramian = gramian

    def gramian(self) -> Tensor:
        return self._gramian

    def pair_entries(self) -> None:
        return None

    def combine(self, weights: Tensor) -> list[Tensor]:
        """``Σ_k w_k ∂L_k/∂output`` for every output: its backward through the backbone is ``Jᵀ w``."""
        return [torch.tensordot(weights.to(c.dtype), c, dims=1) for c in self.cotangents]

    def flat(self) -> Tensor:
        raise TypeError("the layerwise Gramian path has no K x P Jacobian: a method that needs it uses TaskJacobian")
