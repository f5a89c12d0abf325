"""What a run's loggers record about it: a plain-data description of a ``MultiTaskModule``, and the CLI's config.

A ``MultiTaskModule`` is built from modules and callables (backbone, heads, losses, metrics, balancer,
optimizer), which do not belong in a checkpoint's ``hyper_parameters`` (they break ``weights_only``
loading), so the module saves none. Loggers still need to know what ran: :func:`describe` turns the module
into plain data (str, numbers, bools, None, lists, dicts) that every logger can hold, and the module hands it
to Lightning as its ``hparams_initial`` under ``"multitask"``, so that Lightning's own ``log_hyperparams`` call
at the start of each run gives it to every logger (W&B run config, TensorBoard hparams, CSV ``hparams.yaml``)
on rank zero, beside the data module's hyper-parameters. The checkpoint is unchanged.

The ``lightning-mtl`` command also gives a ``WandbLogger`` its whole resolved config
(:func:`log_config_to_wandb`): the config as the run config, and ``config.yaml`` as a file of the run.

Weights & Biases is an optional dependency (``pip install lightning-mtl[wandb]``): nothing here imports it
unless a ``WandbLogger`` is in use, and :func:`require_wandb` fails with the install hint.
"""

from __future__ import annotations

import enum
import functools
import inspect
import math
import os
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_mtl.balancers import BALANCERS

if TYPE_CHECKING:
    from lightning.pytorch.loggers import WandbLogger

    from lightning_mtl.module import MultiTaskModule

WANDB_INSTALL_HINT = "pip install lightning-mtl[wandb]"

#: Tensors with at most this many elements (a loss's class weights, ...) are described by their values.
_SMALL_TENSOR = 64
#: A composite head's one-line ``repr`` is cut to this many characters.
_REPR_LIMIT = 500
#: The CLI config's folder inside a W&B run's files (W&B keeps its own ``config.yaml`` at the top).
WANDB_CONFIG_FOLDER = "lightning-mtl"


def describe(module: "MultiTaskModule") -> dict[str, Any]:
    """``module`` as plain data, for loggers: what a run config should say about a multi-task model.

    Keys:

    - ``tasks``: ``{name: {head, loss, metrics, weight}}`` in registry order; ``head`` and ``loss`` as
      :func:`describe_object` gives them (a composite head adds its one-line ``repr``; a loss function is
      described as a callable), ``metrics`` ``{name: {class_path, init_args}}``, ``weight`` the static weight;
    - ``backbone``: ``{class_path, init_args}``;
    - ``balancer``: ``{name, class_path, init_args}`` (``name``: the registered name, else the class name);
    - ``gradients`` and ``nonfinite_loss``: the module's settings;
    - ``optimizer`` and ``lr_scheduler``: :func:`describe_callable` of the factories (the default optimizer as
      ``torch.optim.Adam`` with ``lr=0.001``; ``None`` without a scheduler);
    - ``parameters``: the shared and per-task parameter counts of :class:`~lightning_mtl.callbacks.MultiTaskModelSummary`,
      ``{shared, tasks: {name: ...}, other (if any), total}``, each ``{trainable, total}``.

    ``init_args`` hold the constructor arguments that the object keeps as attributes (see :func:`describe_object`);
    the ``lightning-mtl`` command also logs its whole config to a ``WandbLogger``, where every argument is.
    """
    description: dict[str, Any] = {
        "tasks": {name: _describe_task(task) for name, task in module.tasks.items()},
        "backbone": describe_object(module.backbone),
        "balancer": _describe_balancer(module.balancer),
        "gradients": module.gradients,
        "nonfinite_loss": module.nonfinite_loss,
        "optimizer": (
            {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3}}
            if module.optimizer_factory is None
            else describe_callable(module.optimizer_factory)
        ),
        "lr_scheduler": describe_callable(module.lr_scheduler_factory),
    }
    parameters = parameter_summary(module)
    if parameters is not None:
        description["parameters"] = parameters
    return description


def describe_object(obj: Any) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": {...}}`` of an object, as a ``lightning-mtl`` YAML config would name it.

    ``init_args`` are the parameters of the class's ``__init__`` whose values the object keeps, found as an
    attribute of the same name (or with a leading underscore) on the object or, for a module, on one of its
    direct submodules (a balancer's torchjd weighting), and only when the value is plain data: numbers, strings,
    bools, None, small tensors (as lists), lists and dicts of those. A value of another kind than the
    parameter's default is left out (``nn.Linear`` keeps ``bias`` as a tensor, not the ``bool`` it was given).
    Arguments the object does not keep are not known here and are left out.
    """
    return {"class_path": _qualified_name(type(obj)), "init_args": _init_args(obj)}


def describe_callable(factory: Any) -> Optional[dict[str, Any]]:
    """A factory (``optimizer``, ``lr_scheduler``, a loss function) as plain data, or None for None.

    - a ``functools.partial`` of a class, including the callables the ``lightning-mtl`` command builds from
      ``class_path``/``init_args`` (jsonargparse's partial, whose target class is one of its arguments):
      ``{"class_path", "init_args"}`` with the bound keyword arguments;
    - a class: ``{"class_path", "init_args": {}}``;
    - a ``partial`` of a function: ``{"function", "kwargs"}``;
    - another function (a lambda, a ``def``): ``{"function"}`` with its qualified name, and ``closure`` with the
      plain-data variables it closes over (``lambda p: SGD(p, lr=lr)`` records ``lr``);
    - anything else: ``{"repr"}``.
    """
    if factory is None:
        return None
    if isinstance(factory, functools.partial):
        target = factory.func if isinstance(factory.func, type) else None
        if target is None:  # jsonargparse: partial(call_without_instantiate_context, instantiator, cls, **init_args)
            target = next((arg for arg in reversed(factory.args) if isinstance(arg, type)), None)
        kwargs = _plain_mapping(factory.keywords)
        if target is not None:
            return {"class_path": _qualified_name(target), "init_args": kwargs}
        described: dict[str, Any] = {"function": _qualified_name(factory.func), "kwargs": kwargs}
        args = [_plain(arg) for arg in factory.args]
        if factory.args and all(arg is not _NOT_PLAIN for arg in args):
            described["args"] = args
        return described
    if isinstance(factory, type):
        return {"class_path": _qualified_name(factory), "init_args": {}}
    if inspect.isfunction(factory) or inspect.isbuiltin(factory):
        described = {"function": _qualified_name(factory)}
        if inspect.isfunction(factory):
            closure = _plain_mapping(inspect.getclosurevars(factory).nonlocals)
            if closure:
                described["closure"] = closure
        return described
    if isinstance(factory, nn.Module):
        return describe_object(factory)
    return {"repr": _one_line(repr(factory))}


def parameter_summary(module: "MultiTaskModule") -> Optional[dict[str, Any]]:
    """The shared and per-task parameter counts (:func:`~lightning_mtl.callbacks.model_summary.parameter_rows`) as
    ``{shared, tasks: {name: ...}, other (if any), total}``, each ``{"trainable": n, "total": n}``.

    None, with a warning, when a task is named ``"shared"`` (the name the counts reserve).
    """
    from lightning_mtl.callbacks.model_summary import parameter_rows

    if "shared" in module.task_names:
        rank_zero_warn(
            "a task is named 'shared', which parameter_counts reserves for the shared count; the run config holds no "
            "parameter counts. Rename the task to have them."
        )
        return None
    summary: dict[str, Any] = {"tasks": {}}
    task_parts = {f"task {name}": name for name in module.task_names}
    for part, trainable, total in parameter_rows(module):
        counts = {"trainable": trainable, "total": total}
        if part in task_parts:
            summary["tasks"][task_parts[part]] = counts
        else:
            summary[part] = counts
    return {"shared": summary.pop("shared"), **summary}


# ---------------------------------------------------------------------------------------- Weights & Biases


def require_wandb(what: str = "this option") -> None:
    """Raise ``ImportError`` with the install hint when wandb cannot be imported."""
    try:
        import wandb  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"{what} needs Weights & Biases (wandb), which is not installed: {WANDB_INSTALL_HINT}"
        ) from error


def wandb_available() -> bool:
    """Whether ``import wandb`` works."""
    try:
        require_wandb()
    except ImportError:
        return False
    return True


def log_config_to_wandb(logger: "WandbLogger", config: Mapping[str, Any], path: Optional[str] = None) -> Optional[Path]:
    """Give a W&B run the ``lightning-mtl`` command's resolved config: as its run config, and as a file.

    ``config`` (the parsed YAML, plain data) goes to the run config with ``log_hyperparams`` (keys ``model``,
    ``data``, ``trainer``, ``seed_everything``, ...). ``path``, the ``config.yaml`` the command wrote beside the
    checkpoints, is copied to ``lightning-mtl/<name>`` in the run's files (W&B's own ``config.yaml`` is at the
    top of them) and saved with the run, so that it is uploaded with it (at once online, by ``wandb sync``
    offline). Returns the copy's path.
    """
    logger.log_hyperparams(dict(config))
    if path is None:
        return None
    run = logger.experiment
    folder = Path(run.dir) / WANDB_CONFIG_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / os.path.basename(path)
    shutil.copyfile(path, copy)
    run.save(str(copy), base_path=run.dir, policy="now")
    return copy


# ---------------------------------------------------------------------------------------- helpers


def _describe_task(task: Any) -> dict[str, Any]:
    head = describe_object(task.head)
    if any(True for _ in task.head.children()):
        head["repr"] = _one_line(repr(task.head))
    loss = describe_object(task.loss) if isinstance(task.loss, nn.Module) else describe_callable(task.loss)
    return {
        "head": head,
        "loss": loss,
        "metrics": {name: describe_object(metric) for name, metric in task.metrics.items()},
        "weight": task.weight,
    }


def _describe_balancer(balancer: nn.Module) -> dict[str, Any]:
    cls = type(balancer)
    name = next((key for key, registered in BALANCERS.items() if registered is cls), cls.__name__)
    return {"name": name, **describe_object(balancer)}


def _init_args(obj: Any) -> dict[str, Any]:
    try:
        signature = inspect.signature(type(obj).__init__)
    except (TypeError, ValueError):
        return {}
    holders = [obj, *obj.children()] if isinstance(obj, nn.Module) else [obj]
    args: dict[str, Any] = {}
    for parameter in list(signature.parameters.values())[1:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        value = _kept_value(holders, parameter.name)
        if value is _NOT_PLAIN or not _same_kind(value, parameter.default, parameter.empty):
            continue
        args[parameter.name] = value
    return args


class _NotPlain:
    def __repr__(self) -> str:
        return "<not plain data>"


_NOT_PLAIN: Any = _NotPlain()


def _kept_value(holders: list[Any], name: str) -> Any:
    """The plain value of attribute ``name`` (or ``_name``) on the first holder that has it; ``_NOT_PLAIN`` if none."""
    for holder in holders:
        for attribute in (name, f"_{name}"):
            try:
                value = getattr(holder, attribute)
            except Exception:  # a property that cannot be computed here is no kept argument
                continue
            if isinstance(value, nn.Parameter) or callable(value) and not isinstance(value, torch.Tensor):
                continue
            return _plain(value)
    return _NOT_PLAIN


def _same_kind(value: Any, default: Any, empty: Any) -> bool:
    """Whether ``value`` can be what was passed for a parameter of that default (no default, or a None one: any)."""
    if default is empty or default is None:
        return True
    return _kind(value) == _kind(_plain(default))


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return "sequence"
    return type(value).__name__


def _plain(value: Any) -> Any:
    """``value`` as JSON-like plain data, or ``_NOT_PLAIN``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, torch.Tensor):
        if isinstance(value, nn.Parameter) or value.numel() > _SMALL_TENSOR:
            return _NOT_PLAIN
        return _plain(value.detach().cpu().tolist())
    if isinstance(value, (list, tuple)):
        items = [_plain(item) for item in value]
        return _NOT_PLAIN if any(item is _NOT_PLAIN for item in items) else items
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            return _NOT_PLAIN
        items = {key: _plain(item) for key, item in value.items()}
        return _NOT_PLAIN if any(item is _NOT_PLAIN for item in items.values()) else items
    return _NOT_PLAIN


def _plain_mapping(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``mapping`` whose values are plain data, as plain data (others left out)."""
    items = {str(key): _plain(value) for key, value in mapping.items()}
    return {key: value for key, value in items.items() if value is not _NOT_PLAIN}


def _qualified_name(obj: Any) -> str:
    """``obj``'s import path, by its shortest already-imported public module (``torch.optim.Adam``, not
    ``torch.optim.adam.Adam``), as a ``class_path`` is written."""
    module = getattr(obj, "__module__", None)
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__
    if not module or module == "builtins":
        return name
    parts = module.split(".")
    if "." not in name:
        for end in range(1, len(parts)):
            prefix = ".".join(parts[:end])
            if not any(part.startswith("_") for part in parts[:end]) and getattr(sys.modules.get(prefix), name, None) is obj:
                return f"{prefix}.{name}"
    return f"{module}.{name}"


def _one_line(text: str) -> str:
    line = re.sub(r"\s+\)", ")", re.sub(r"\(\s+", "(", " ".join(part.strip() for part in text.splitlines())))
    return line if len(line) <= _REPR_LIMIT else line[: _REPR_LIMIT - 3] + "..."
