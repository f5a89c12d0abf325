"""Runs of the ``lightning-mtl`` command: where a run's files are, and rebuilding its model.

A run's folder holds its ``config.yaml`` (saved by :class:`~lightning_mtl.run_folder.SaveRunConfig`), its
``checkpoints/`` and, for ``predict``, its ``predictions/``. :func:`load_run` rebuilds the model (and
optionally the data module) from that config and one of the checkpoints, with the command's own argument
definitions, so every ``class_path`` resolves as it did in the run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
import yaml
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser

if TYPE_CHECKING:  # imported where used: module.py may import this file (explain_load_error)
    from lightning_mtl.module import MultiTaskModule


def run_dir(trainer: Trainer) -> str:
    """The folder of this run's ``checkpoints/``, derived as Lightning's ``ModelCheckpoint`` derives it.

    ``<save_dir>/<name>/<version>`` of the first logger (``version_N`` for an integer version, a run id such as
    W&B's as it is), or ``default_root_dir`` without a logger.
    """
    if not trainer.loggers:
        return str(trainer.default_root_dir)
    logger = trainer.loggers[0]
    save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return os.path.join(save_dir, str(logger.name), version)


def load_run(
    run: Union[str, os.PathLike],
    checkpoint: str = "best",
    *,
    data: bool = False,
    map_location: Any = None,
    strict: Optional[bool] = None,
) -> Union[MultiTaskModule, tuple[MultiTaskModule, LightningDataModule]]:
    """Rebuild the model of a ``lightning-mtl`` run from its saved config and one of its checkpoints.

    The run's ``config.yaml`` is read with the command's own ``model``/``data`` argument definitions
    (:func:`lightning_mtl.cli.experiment_arguments`), so every ``class_path`` resolves as it did in the run; the
    backbone, tasks, balancer and the rest are built from it and ``MultiTaskModule.load_from_checkpoint`` loads the
    weights (and the balancer's state) into them.

    Args:
        run: the run's folder (the one holding ``config.yaml`` and ``checkpoints/``) or its config file.
        checkpoint: ``"best"``: the best checkpoint recorded by the run's ``ModelCheckpoint`` that monitors a
            metric (the last one if none monitors); ``"last"``: ``checkpoints/last.ckpt`` if the run saved one, else
            the newest file of ``checkpoints/``; or a path (a relative one is also looked for in the run's folder).
        data: also build the run's data module and return ``(model, datamodule)``. The config's integer
            ``seed_everything`` is applied first, as the command did.
        map_location, strict: as for ``load_from_checkpoint``.

    Returns:
        The model in eval mode (``.train()`` to train it further), or ``(model, datamodule)`` with ``data=True``.
    """
    from lightning.pytorch import seed_everything

    from lightning_mtl.cli import experiment_arguments
    from lightning_mtl.module import MultiTaskModule

    config_path = Path(run) / "config.yaml" if Path(run).is_dir() else Path(run)
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: load_run takes a run's folder holding config.yaml (where the lightning-mtl "
            "command saved it, beside checkpoints/) or the config file itself"
        )
    folder = config_path.parent
    path = _checkpoint(folder, checkpoint)
    saved = yaml.safe_load(config_path.read_text())
    if not isinstance(saved, dict) or "model" not in saved:
        raise ValueError(f"{config_path} has no model: section; is it a lightning-mtl run's config?")
    parser = LightningArgumentParser(exit_on_error=False)
    experiment_arguments(parser, build_model=False, data=data)
    given = {"model": saved["model"], **({"data": saved.get("data")} if data else {})}
    config = parser.parse_object(given)
    if data and isinstance(saved.get("seed_everything"), int) and not isinstance(saved["seed_everything"], bool):
        seed_everything(saved["seed_everything"])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    built = instantiate(config)
    model = MultiTaskModule.load_from_checkpoint(path, map_location=map_location, strict=strict, **vars(built.model))
    model.eval()
    if not data:
        return model
    datamodule = built.data
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(type(datamodule).__qualname__)
    if state is not None:
        datamodule.load_state_dict(state)
    return model, datamodule


def explain_load_error(error: TypeError, checkpoint_path: Any) -> None:
    """Raise a ``TypeError`` naming :func:`load_run` if ``error`` is ``MultiTaskModule``'s for a missing backbone or
    tasks (what ``load_from_checkpoint`` without them gives); return otherwise, for the caller to re-raise ``error``.
    """
    message = str(error)
    if "required" not in message or not re.search(r"'(backbone|tasks)'", message):
        return
    given = repr(os.fspath(checkpoint_path)) if isinstance(checkpoint_path, (str, os.PathLike)) else "..."
    run = _run_of(checkpoint_path)
    if run is not None:
        how = (
            f"It was written by a lightning-mtl run whose config is in {run}; rebuild the model from it with\n"
            f"    lightning_mtl.load_run({str(run)!r}, checkpoint={given})"
        )
    else:
        how = (
            "If the lightning-mtl command wrote it, rebuild the model from the run's config with\n"
            f"    lightning_mtl.load_run(<the run's folder, holding config.yaml>, checkpoint={given})"
        )
    raise TypeError(
        f"MultiTaskModule.load_from_checkpoint({given}) cannot rebuild the model: {message}. A MultiTaskModule keeps "
        f"its backbone, tasks and balancer out of the checkpoint (they are modules, not hyper-parameters). {how}\n"
        "or pass them yourself: MultiTaskModule.load_from_checkpoint(path, backbone=..., tasks=..., balancer=...)."
    ) from error


def _run_of(checkpoint_path: Any) -> Optional[Path]:
    """The run folder of a checkpoint in ``<run>/checkpoints/`` beside a ``config.yaml``, else None."""
    if not isinstance(checkpoint_path, (str, os.PathLike)):
        return None
    parent = Path(checkpoint_path).resolve().parent
    if parent.name == "checkpoints" and (parent.parent / "config.yaml").is_file():
        return parent.parent
    return None


def _checkpoint(folder: Path, which: str) -> Path:
    """The checkpoint file ``which`` (``"best"``, ``"last"`` or a path) of the run in ``folder``."""
    if which not in ("best", "last"):
        for path in (Path(which), folder / which):
            if path.is_file():
                return path
        raise FileNotFoundError(f"checkpoint {which} not found (looked for it as given and in {folder})")
    found = sorted((folder / "checkpoints").glob("*.ckpt"), key=lambda path: path.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"{folder / 'checkpoints'} holds no .ckpt file; pass checkpoint= a path")
    saved_last = [path for path in found if path.name.startswith("last")]
    last = (saved_last or found)[-1]
    if which == "last":
        return last
    callbacks = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("callbacks", {})
    bests = sorted(
        {
            str(state["best_model_path"])
            for key, state in callbacks.items()
            if str(key).startswith("ModelCheckpoint") and state.get("monitor") and state.get("best_model_path")
        }
    )
    if not bests:
        return last  # no checkpoint callback monitors a metric: its latest checkpoint is its best
    if len(bests) > 1:
        raise ValueError(
            f"the run's checkpoint callbacks record different best checkpoints {bests}; pass one as checkpoint="
        )
    for path in (folder / "checkpoints" / Path(bests[0]).name, Path(bests[0])):
        if path.is_file():
            return path
    raise FileNotFoundError(f"the best checkpoint {bests[0]} recorded by the run is gone; pass checkpoint= another one")
