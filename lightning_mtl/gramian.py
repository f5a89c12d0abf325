"""The Gramian ``J Jᵀ`` of the task Jacobian of the shared parameters, layer by layer, without forming ``J`` (K × P).

A Gramian weighting (UPGrad, MGDA, ...) needs only the K × K Gramian of the task gradients and then
one weighted backward. The Gramian is a sum over parameters, so it can be formed one layer at a time:

- a **linear layer** (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``) called with input rows ``A`` (N × in;
  for a convolution the unfolded patches) and receiving the task cotangents ``D_k`` (N × out) at its
  output has the weight gradients ``D_kᵀ A``. Its block of the Gramian is either
  ``Σ_{r,r'} (D_k D_lᵀ)_{rr'} (A Aᵀ + 1)_{rr'}`` (the *kernel* form: the ``+ 1`` is the bias; costs
  ``N²·in + K·N·out·(N + K)``) or ``<D_kᵀ A, D_lᵀ A>`` from the explicit K × (out·in) block, cut into
  slices of output features (costs ``K·in·out·(N + K)``). The cheaper one is used, per layer and step.
  A module called several times in the forward gets the rows of all its calls (its weight's gradient
  is their sum). The inputs ``A`` are recorded by a forward hook (:class:`LayerRecorder`); the
  cotangents ``D_k`` arrive, all K at once, in **one batched backward** of the task cotangents through
  the backbone that computes no parameter gradient: a hook on each layer's output node turns them into
  the layer's block and drops them, so only one layer's are held at a time.
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
layers' cotangents are then held for all layers at once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node
from torch.nn.modules.module import register_module_forward_hook

#: Parameter mode forms the Gramian layer by layer (for a Gramian weighting, in one process) from this many
#: Jacobian entries K × P on; below, the materialised Jacobian costs little memory and is faster (W-MLP,
#: 0.5 M shared parameters: from K = 4 on; see ``docs/balancers.md``, *Cost*). 0: always.
LAYERWISE_MIN_ENTRIES = 1 << 21
#: Elements one slice of an explicit per-layer block may hold (K × slice): 16 MB in float32.
WORKSPACE = 1 << 22
#: The kernel form is used only up to this many rows (its N × N kernel is held whole).
KERNEL_MAX_ROWS = 4096
#: Fallback parameters whose rows are formed in one backward: up to this share of the shared parameters
#: (or :data:`WORKSPACE` rows' entries, if more).
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


def has_kernel_rule(module: nn.Module) -> bool:
    """Whether the module computes ``F.linear`` / ``F.conv1d`` / ``F.conv2d`` of its input, as torch's classes do."""
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    for base in (nn.Conv1d, nn.Conv2d):
        if isinstance(module, base):
            return (
                type(module).forward is base.forward
                and type(module)._conv_forward is base._conv_forward
                and module.groups == 1
                and hasattr(module, "_reversed_padding_repeated_twice")
            )
    return False


def _trainable(module: nn.Module) -> list[Tensor]:
    return [p for p in (module.weight, module.bias) if p is not None and p.requires_grad]


def wants_layerwise(num_tasks: int, params: Sequence[Tensor]) -> bool:
    """Whether the Gramian of ``num_tasks`` tasks' gradients of ``params`` is to be formed layer by layer."""
    return bool(params) and num_tasks * sum(p.numel() for p in params) >= LAYERWISE_MIN_ENTRIES


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
        if not any(id(p) in self._ids for p in _trainable(module)):
            return
        x = args[0]
        if isinstance(x, Tensor) and isinstance(output, Tensor) and output.grad_fn is not None:
            call = LayerCall(module, x, x._version, output.grad_fn, output.output_nr, output.shape, output.dtype)
            self.calls.append(call)


# ---------------------------------------------------------------------------------------- one layer's block


def _conv_geometry(module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...], Any, Any, Any]:
    """The convolution's (batched, padded) input and its kernel size, stride, padding, dilation."""
    spatial = 1 if isinstance(module, nn.Conv1d) else 2
    if x.dim() == spatial + 1:  # an unbatched input
        x = x.unsqueeze(0)
    padding = module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":  # padded as the module's forward does
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    return x, module.kernel_size, module.stride, padding, module.dilation


def _input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The rows ``A`` (N × in) whose products with the output cotangents give the weight gradient."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    x, size, stride, padding, dilation = _conv_geometry(module, x)
    if isinstance(module, nn.Conv1d):  # as a 2-d convolution of height 1
        x, size, stride, dilation = x.unsqueeze(2), (1, *size), (1, *stride), (1, *dilation)
        padding = (0, *padding) if isinstance(padding, tuple) else (0, padding)
    columns = F.unfold(x, size, dilation=dilation, padding=padding, stride=stride)
    return columns.transpose(1, 2).reshape(-1, columns.shape[1])


def _output_rows(module: nn.Module, d: Tensor) -> Tensor:
    """The K output cotangents as rows, ``(K, N, out)``, in the order of :func:`_input_rows`."""
    k = d.shape[0]
    if isinstance(module, nn.Linear):
        return d.reshape(k, -1, d.shape[-1])
    spatial = 1 if isinstance(module, nn.Conv1d) else 2
    if d.dim() == spatial + 2:  # an unbatched call
        d = d.unsqueeze(1)
    return d.movedim(2, -1).reshape(k, -1, d.shape[2])


def _fan_in(module: nn.Module) -> int:
    return module.weight[0].numel()


def _weight_slice(module: nn.Module, x: Tensor, d: Tensor, start: int, stop: int) -> Tensor:
    """Rows ``(K, (stop - start)·in)`` of the Jacobian of output features ``start:stop`` of the weight, for one call."""
    k = d.shape[0]
    if isinstance(module, nn.Linear):
        rows = _output_rows(module, d)[:, :, start:stop]
        return torch.matmul(rows.transpose(1, 2), _input_rows(module, x)).reshape(k, -1)
    x, _, stride, padding, dilation = _conv_geometry(module, x)
    d = d if d.dim() == x.dim() + 1 else d.unsqueeze(1)
    stacked = d[:, :, start:stop].movedim(0, 1).flatten(1, 2)  # (B, K·slice, *spatial): the K tasks as channels
    size = (stacked.shape[1], *module.weight.shape[1:])
    weight_grad = torch.nn.grad.conv1d_weight if isinstance(module, nn.Conv1d) else torch.nn.grad.conv2d_weight
    return weight_grad(x, size, stacked, stride, padding, dilation).reshape(k, -1)


def _cat(tensors: list[Tensor], dim: int = 0) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def layer_gramian(module: nn.Module, pieces: list[tuple[Tensor, Tensor]], dtype: torch.dtype) -> Tensor:
    """The K × K Gramian of a linear layer's trainable parameters, from its calls' ``(input, cotangents (K, *out))``."""
    pieces = [(x.to(dtype), d.to(dtype)) for x, d in pieces]
    k = pieces[0][1].shape[0]
    weight = module.weight.requires_grad
    bias = module.bias is not None and module.bias.requires_grad
    fan_in, fan_out = _fan_in(module), module.weight.shape[0]
    n = sum(_output_rows(module, d).shape[1] for _, d in pieces)
    kernel_cost = n * n * fan_in + k * n * fan_out * (n + k)
    if weight and n <= KERNEL_MAX_ROWS and kernel_cost < k * fan_in * fan_out * (n + k):
        a = _cat([_input_rows(module, x) for x, _ in pieces])
        d = _cat([_output_rows(module, d) for _, d in pieces], dim=1)
        kernel = a @ a.T
        if bias:
            kernel += 1
        return d.reshape(k, -1) @ torch.matmul(kernel, d).reshape(k, -1).T
    gramian = pieces[0][1].new_zeros(k, k)
    if bias:
        sums = sum(_output_rows(module, d).sum(dim=1) for _, d in pieces)
        gramian += sums @ sums.T
    if weight:
        step = max(1, WORKSPACE // (k * fan_in))
        for start in range(0, fan_out, step):
            block = sum(_weight_slice(module, x, d, start, min(start + step, fan_out)) for x, d in pieces)
            gramian += block @ block.T
    return gramian


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
    layers = {m: c for m, c in layers.items() if all(id(p) in ids for p in _trainable(m))}
    owners: dict[int, nn.Module] = {}
    for module in layers:
        for p in _trainable(module):
            if owners.setdefault(id(p), module) is not module:  # one parameter in two modules (tied)
                owners[id(p)] = None  # type: ignore[assignment]
    elsewhere = used_elsewhere([c for cs in layers.values() for c in cs], outputs, [p for m in layers for p in _trainable(m)])
    return {
        m: c for m, c in layers.items() if all(owners[id(p)] is m and id(p) not in elsewhere for p in _trainable(m))
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
    # a layer on the backbone's input: its node would not run (nothing below it is asked for), so its output is
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
                acc.add(rows @ rows.T)
        if number == 0:
            acc.deliver_per_task()
            missing = [(m, i, acc.layers[m][i]) for m, i in acc.missing()]
            if missing:  # a layer the first backward did not run through (its input needs no gradient of ours)
                for (m, i, _), grad in zip(missing, _backward(acc, outputs, cotangents, [c for _, _, c in missing])):
                    acc.deliver(m, i, grad)
    return reached


def layerwise_gramian(
    calls: Sequence[LayerCall], outputs: Sequence[Tensor], cotangents: Sequence[Tensor], params: Sequence[Tensor]
) -> Tensor:
    """The K × K Gramian of the Jacobian of ``params`` whose rows are the task cotangents ``cotangents[j]``
    (``(K, *outputs[j].shape)``) back-propagated from ``outputs``: exact, without the K × P Jacobian.

    ``calls`` are the linear-layer calls recorded in the forward (:class:`LayerRecorder`); the graph is kept.
    """
    from lightning_mtl.gradients import _REENTRANT

    num_tasks = cotangents[0].shape[0]
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    layers = kernel_layers(calls, outputs, params)
    covered = {id(p) for m in layers for p in _trainable(m)}
    fallback = [p for p in params if id(p) not in covered]
    cap = max(FALLBACK_SHARE * sum(p.numel() for p in params), WORKSPACE / num_tasks)
    groups = _fallback_groups(fallback, cap)
    acc = _Accumulator(layers, num_tasks, dtype)
    handles = [
        call.node.register_prehook(acc.hook(m, i)) for m, cs in layers.items() for i, call in enumerate(cs) if call.input.requires_grad
    ]
    try:
        try:
            reached = _passes(acc, outputs, cotangents, groups)
        except RuntimeError as error:
            if "use_reentrant" in str(error) or "Checkpointing is not compatible" in str(error):
                raise ValueError(_REENTRANT) from error
            acc.reset()  # an operation without a batching rule: one backward per task
            acc.batched = False
            reached = _passes(acc, outputs, cotangents, groups)
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
    :meth:`gramian`, and :meth:`combine` giving the direction at the ``inputs`` (here the backbone outputs).
    """

    def __init__(self, outputs: Sequence[Tensor], cotangents: Sequence[Tensor], gramian: Tensor) -> None:
        self.inputs = list(outputs)
        self.cotangents = list(cotangents)
        self._gramian = gramian

    def gramian(self) -> Tensor:
        return self._gramian

    def combine(self, weights: Tensor) -> list[Tensor]:
        """``Σ_k w_k ∂L_k/∂output`` for every output: its backward through the backbone is ``Jᵀ w``."""
        return [torch.tensordot(weights.to(c.dtype), c, dims=1) for c in self.cotangents]

    def flat(self) -> Tensor:
        raise TypeError("the layerwise Gramian path has no K x P Jacobian: a method that needs it uses TaskJacobian")
