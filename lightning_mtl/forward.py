"""The forward half of a multi-task step: batches normalised to groups, the backbone and heads run, task losses.

:class:`TaskForward` belongs to one :class:`~lightning_mtl.MultiTaskModule` and reads its backbone,
heads and tasks. The training step, the evaluation steps and FAMO's post-step recomputation all go
through it, so every stage treats unlabelled samples, per-task inputs and head errors alike. What
the balancing paths need from the forward — detached leaves for the heads (parameter mode), or one
view of the backbone output per task (representation mode) — is passed in as ``captured`` /
``balance`` (see :mod:`lightning_mtl.updates`).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mtl.balancers._utils import all_true
from lightning_mtl.gradients import TaskJacobian, task_views

if TYPE_CHECKING:
    from lightning_mtl.module import MultiTaskModule

# One backbone input with the labels of the tasks it carries: `(x, {task: y})`.
Group = tuple[Any, dict[str, Tensor]]
# A head's output with its target: (task, prediction, target, may have unlabelled samples).
Prediction = tuple[str, Tensor, Tensor, bool]


class ModuleUnit:
    """A unit of a :class:`~lightning_mtl.MultiTaskModule` that reads its module through a weak reference.

    The module owns the unit; a strong reference back would make a cycle, and a deleted model would keep
    its memory (a GPU's too) until the garbage collector ran. A copy or a pickle of a unit drops the
    reference; the module links its units again when it is copied or unpickled
    (``MultiTaskModule.__setstate__``).
    """

    def __init__(self, module: "MultiTaskModule") -> None:
        self.link(module)

    def link(self, module: "MultiTaskModule") -> None:
        self._module = weakref.ref(module)

    @property
    def module(self) -> "MultiTaskModule":
        return self._module()  # type: ignore[return-value]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_module"] = None
        return state


class TaskForward(ModuleUnit):
    """Runs the module's backbone and heads on a batch and computes the task losses over labelled samples."""

    def __init__(self, module: "MultiTaskModule") -> None:
        super().__init__(module)
        # the registry and the heads, held directly (no cycle: they do not reference the module), read per task
        self.tasks, self.heads, self.task_names = module.tasks, module.heads, module.task_names
        self._task_index = {name: k for k, name in enumerate(module.task_names)}
        #: the step's regularisers when the backbone ran once per group of per-task inputs (see :meth:`run`)
        self.combined_regularization: Optional[dict[str, Tensor]] = None
        self._all_present_mask: Optional[Tensor] = None  # cached all-True task mask (no state, not a buffer)
        self._shapes_checked: set[str] = set()  # tasks whose prediction and target shapes were checked once
        #: (backbone parameters, all parameters), gathered at first use in a fit (the module resets it in setup)
        self.parameters_cache: Optional[tuple[tuple[nn.Parameter, ...], tuple[nn.Parameter, ...]]] = None
        #: representation mode: the task cotangent stacks' memory, kept across steps (see gradients.task_views)
        self.cotangent_buffers: dict[int, Tensor] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "cotangent_buffers": {}}  # scratch memory: not copied or pickled

    def parameter_lists(self) -> tuple[tuple[nn.Parameter, ...], tuple[nn.Parameter, ...]]:
        """(backbone parameters, all parameters), gathered once per fit: walking the tree costs ~0.2 ms."""
        if self.parameters_cache is None:
            module = self.module
            self.parameters_cache = (tuple(module.backbone.parameters()), tuple(module.parameters()))
        return self.parameters_cache

    def head(
        self,
        name: str,
        features: Union[Tensor, Mapping[str, Tensor]],
        captured: Optional[dict[str, tuple[Tensor, Tensor]]] = None,
    ) -> Tensor:
        """Task ``name``'s head on its backbone features.

        With ``captured`` (gradient-level balancing) the head reads a detached leaf copy of its
        features, recorded as ``captured[name] = (features, leaf)``: the heads' backward then stops at
        the backbone output, where it yields each task's own cotangent, and the backbone receives the
        balanced direction instead (see :mod:`lightning_mtl.gradients`).
        """
        if isinstance(features, Mapping):
            if name not in features:
                raise KeyError(
                    f"task {name!r}: the backbone returned a dict without this task (keys: {sorted(features)}); "
                    "a backbone returning a dict must have one entry per task"
                )
            features = features[name]
        if captured is not None and not isinstance(features, Tensor):
            raise TypeError(
                f"task {name!r}: balancer {type(self.module.balancer).__name__} balances the task gradients at the backbone "
                f"output, so the backbone must return one tensor (or a {{task: tensor}} dict); "
                f"{type(self.module.backbone).__name__} returned a {type(features).__name__}. Return the tensor the heads "
                "share (put extra outputs in a dict keyed by task), or use a loss-level balancer."
            )
        if captured is not None and features.requires_grad:
            leaf = features.detach().requires_grad_()
            captured[name] = (features, leaf)
            features = leaf
        try:
            return self.heads[name](features)
        except RuntimeError as error:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise RuntimeError(
                f"task {name!r}: head {type(self.heads[name]).__name__} failed on the backbone output of shape "
                f"{shape}: {error}. Check that the head's input width matches the backbone's output width."
            ) from error

    def groups(self, batch: Any) -> list[Group]:
        """Normalise both batch forms to a list of ``(x, {task: y})`` and check the task names."""
        if isinstance(batch, Mapping):
            groups = []
            for name, item in batch.items():
                if not (isinstance(item, (tuple, list)) and len(item) == 2):
                    raise TypeError(
                        f"task {name!r}: a per-task batch must map each task to (x, y), got {type(item).__name__}"
                    )
                groups.append((item[0], {name: item[1]}))
        elif isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Mapping):
            groups = [(batch[0], dict(batch[1]))]
        else:
            raise TypeError(
                "a multi-task batch is either (x, {task: y}) (one input labelled for several tasks) or "
                f"{{task: (x, y)}} (one input per task); got {type(batch).__name__}"
            )
        for _, labels in groups:
            for name in labels:
                if name not in self.tasks:
                    raise ValueError(
                        f"the batch has data for task {name!r}, which the model does not have; "
                        f"model tasks: {self.task_names}. Add a Task named {name!r} or drop it from the data."
                    )
        return groups

    def run(
        self,
        groups: list[Group],
        captured: Optional[dict[str, tuple[Tensor, Tensor]]] = None,
        balance: Optional[Callable[[TaskJacobian], list[Tensor]]] = None,
    ) -> tuple[list[Any], list[Prediction]]:
        """Run the backbone and the heads on every group of the batch.

        Returns what the heads read (the backbone outputs actually computed; in representation mode
        ``views[j][k]``, task k's view of output j) and ``(task, prediction, target, may have
        unlabelled samples)`` for every task. Per-task inputs of identical shape go through the
        backbone in one call (one concatenated batch). ``captured`` (parameter mode) makes the heads
        read detached leaves (:meth:`head`); ``balance`` (representation mode) gives each head its own
        view of the outputs, which the backward balances with it (:func:`~lightning_mtl.gradients.task_views`).
        """
        inputs = [x for x, _ in groups]
        stacked = len(groups) > 1 and _stackable(inputs)
        outputs = self._backbone(inputs, stacked)
        sources: list[Any] = outputs  # what group i's heads read: sources[0 if stacked else i]
        if balance is not None:
            self._check_representation(outputs)
            if any(output.requires_grad for output in outputs):  # else a frozen backbone
                buffers = self.__dict__.setdefault("cotangent_buffers", {})  # a module pickled before it existed
                sources = task_views(outputs, len(self.task_names), balance, buffers)
        sizes = [x.shape[0] for x in inputs] if stacked else []
        parts: dict[int, list[Any]] = {}  # a stacked output (or view) cut into the groups' parts, once

        def features(i: int, name: str) -> Any:
            source = sources[0 if stacked else i]
            if sources is not outputs:
                source = source[self._task_index[name]]
            if not stacked:
                return source
            if id(source) not in parts:
                parts[id(source)] = _split_features(source, sizes)
            return parts[id(source)][i]

        predictions = []
        for i, (_, labels) in enumerate(groups):
            flagged = self.tasks_missing_labels(labels)
            for name, target in labels.items():
                prediction = self.head(name, features(i, name), captured)
                predictions.append((name, prediction, target, name in flagged))
        return sources, predictions

    def _backbone(self, inputs: list[Any], stacked: bool) -> list[Any]:
        """The backbone's outputs: one call on the stacked inputs, or one call per group's input."""
        backbone, regularization_losses = self.module.backbone, self.module._regularization_losses
        self.combined_regularization = None
        if stacked or len(inputs) == 1 or regularization_losses is None:
            return [backbone(torch.cat(inputs))] if stacked else [backbone(x) for x in inputs]
        # One backbone call per group: a regulariser computed from the inputs (DSelectK's) would report the
        # last call's only. Combine every call's, weighted by its samples, as one stacked call would.
        outputs, terms = [], []
        for x in inputs:
            outputs.append(backbone(x))
            terms.append((_num_samples(x), regularization_losses()))
        samples = sum(n for n, _ in terms)
        self.combined_regularization = {name: sum(n * values[name] for n, values in terms) / samples for name in terms[-1][1]}
        return outputs

    def _check_representation(self, outputs: list[Any]) -> None:
        """Representation mode needs one shared tensor from the backbone."""
        if any(isinstance(output, Mapping) for output in outputs):
            raise ValueError(
                f"gradients='representation' needs a backbone that returns one shared tensor; "
                f"{type(self.module.backbone).__name__} returns one tensor per task, so the tasks share no "
                "representation. Use gradients='parameters'."
            )
        if not all(isinstance(output, Tensor) for output in outputs):
            kind = next(type(output).__name__ for output in outputs if not isinstance(output, Tensor))
            raise TypeError(
                f"gradients='representation' needs a backbone that returns one shared tensor; "
                f"{type(self.module.backbone).__name__} returned a {kind}. Return the tensor the heads share, or use a "
                "loss-level balancer."
            )

    def tasks_missing_labels(self, labels: Mapping[str, Tensor]) -> set[str]:
        """Names of the tasks whose targets hold an unlabelled sample.

        One fused reduction per target dtype for the usual per-sample (1-D) targets of equal length,
        instead of one per task; other targets are checked one by one.
        """
        flagged: set[str] = set()
        by_dtype: dict[tuple[torch.dtype, int], list[str]] = {}
        for name, target in labels.items():
            if isinstance(target, Tensor) and target.ndim == 1 and target.dtype != torch.bool:
                by_dtype.setdefault((target.dtype, target.shape[0]), []).append(name)
            elif _missing_labels(target, self.tasks[name].ignore_index) is not None:
                flagged.add(name)
        for (dtype, _), names in by_dtype.items():
            targets = torch.stack([labels[name] for name in names])
            if dtype.is_floating_point:
                missing = torch.isnan(targets)
            else:
                ignore = torch.tensor([self.tasks[name].ignore_index for name in names], device=targets.device)
                missing = targets == ignore.unsqueeze(1)
            flagged.update(name for name, flag in zip(names, missing.any(dim=1).tolist()) if flag)
        return flagged

    def loss(
        self, name: str, prediction: Tensor, target: Tensor, maybe_missing: bool = True
    ) -> tuple[Optional[Tensor], Tensor, Tensor, int]:
        """The task loss over its labelled samples (None if there are none) and the samples used.

        ``maybe_missing=False`` (from :meth:`tasks_missing_labels`) skips the per-task label check.
        """
        missing = _missing_labels(target, self.tasks[name].ignore_index) if maybe_missing else None
        if missing is not None:
            keep = ~missing
            prediction, target = prediction[keep], target[keep]
        count = target.shape[0] if target.ndim else 1
        if count == 0:
            return None, prediction, target, 0
        if name not in self._shapes_checked:
            _check_elementwise_shapes(name, self.tasks[name].loss, prediction, target)
            self._shapes_checked.add(name)
        try:
            loss = self.tasks[name].loss(prediction, target)
        except (RuntimeError, ValueError, IndexError) as error:
            raise type(error)(
                f"task {name!r}: the loss failed on prediction of shape {tuple(prediction.shape)} and target of "
                f"shape {tuple(target.shape)} ({target.dtype}): {error}"
            ) from error
        return loss, prediction, target, count

    def stack_losses(self, task_losses: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Task losses in registry order (0 for a task without one) and the mask of tasks that have one."""
        task_names = self.task_names
        if len(task_losses) == len(task_names):  # every task present: the common case
            losses = torch.stack([task_losses[name] for name in task_names])
            self._all_present_mask = all_true(self._all_present_mask, len(task_names), losses.device)
            return losses, self._all_present_mask
        zero = next(iter(task_losses.values())).new_zeros(()) if task_losses else torch.zeros((), device=self.module.device)
        losses = torch.stack([task_losses.get(name, zero) for name in task_names])
        return losses, torch.tensor([name in task_losses for name in task_names], device=losses.device)


#: Losses computed element by element, which broadcast a prediction against a target of another shape.
_ELEMENTWISE_LOSSES = (
    nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss, nn.SoftMarginLoss,
    nn.PoissonNLLLoss, nn.KLDivLoss,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS = (
    F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.binary_cross_entropy, F.binary_cross_entropy_with_logits,
    F.soft_margin_loss, F.poisson_nll_loss, F.kl_div,
)  # fmt: skip


def _check_elementwise_shapes(name: str, loss: Any, prediction: Tensor, target: Tensor) -> None:
    """An element-wise loss on a prediction and a target of different shapes broadcasts them (an ``(N, 1)``
    head against an ``(N,)`` target trains on an ``(N, N)`` loss) with only a warning: refuse it, naming both."""
    function = loss.func if isinstance(loss, functools.partial) else loss
    # the exact classes only: a subclass may reshape its inputs in its own forward
    elementwise = type(function) in _ELEMENTWISE_LOSSES or any(function is f for f in _ELEMENTWISE_FUNCTIONS)
    if not elementwise or not isinstance(prediction, Tensor) or not isinstance(target, Tensor):
        return
    if prediction.shape != target.shape:
        hint = ""
        if prediction.ndim == target.ndim + 1 and prediction.shape[-1] == 1:
            hint = " End the head with nn.Flatten(0) (or squeeze its last dimension) to predict shape (N,)."
        elif target.ndim == prediction.ndim + 1 and target.shape[-1] == 1:
            hint = " Give the targets shape (N,) (squeeze their last dimension), or make the head predict (N, 1)."
        raise ValueError(
            f"task {name!r}: the head's prediction has shape {tuple(prediction.shape)} but the target has shape "
            f"{tuple(target.shape)}; {type(function).__name__ if isinstance(function, nn.Module) else function.__name__} "
            f"compares them element by element, so they would be broadcast to a different shape and the loss "
            f"would be wrong.{hint}"
        )


def _missing_labels(target: Tensor, ignore_index: int) -> Optional[Tensor]:
    """Boolean mask of unlabelled samples, or None when every sample is labelled.

    A sample is unlabelled when its regression target has a NaN, or all its class targets equal
    ``ignore_index`` (dense targets with some ignored entries are left to the loss's own masking).
    """
    if not isinstance(target, Tensor) or target.ndim == 0:
        return None
    if target.is_floating_point():
        missing = torch.isnan(target)
    elif target.dtype == torch.bool:
        return None
    else:
        missing = target == ignore_index
    if not bool(missing.any()):
        return None
    if target.ndim == 1:
        return missing
    flat = missing.reshape(target.shape[0], -1)
    return flat.any(dim=1) if target.is_floating_point() else flat.all(dim=1)


def _stackable(inputs: list[Any]) -> bool:
    first = inputs[0]
    return isinstance(first, Tensor) and all(
        isinstance(x, Tensor) and x.shape[1:] == first.shape[1:] and x.dtype == first.dtype and x.device == first.device
        for x in inputs[1:]
    )


def _split_features(features: Union[Tensor, Mapping[str, Tensor]], sizes: list[int]) -> list[Any]:
    if isinstance(features, Mapping):
        parts = {name: torch.split(value, sizes) for name, value in features.items()}
        return [{name: parts[name][i] for name in parts} for i in range(len(sizes))]
    return list(torch.split(features, sizes))


def _num_samples(x: Any) -> int:
    """The number of samples of a backbone input: its (first tensor's) first dimension, else 1."""
    if isinstance(x, Tensor):
        return x.shape[0] if x.ndim else 1
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    return next((_num_samples(value) for value in values if isinstance(value, Tensor)), 1)


