"""A run's folder: where the ``lightning-mtl`` command saves the run's config, and never over another run's.

:class:`SaveRunConfig` is the command's ``SaveConfigCallback``; :func:`claim` creates a file only if it is not
there yet, and :func:`refusal` says what to change when another run's config is. The folder itself is
:func:`lightning_mtl.runs.run_dir`'s.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Optional

import yaml
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn

from lightning_mtl.run_config import log_config_to_wandb
from lightning_mtl.runs import run_dir as run_dir_of


class SaveRunConfig(SaveConfigCallback):
    """Saves the config in the run's own folder, beside its ``checkpoints/``; never over an existing file.

    The folder is the one Lightning's ``ModelCheckpoint`` derives for the run: ``<save_dir>/<name>/<version>``
    of the first logger, or ``default_root_dir`` without a logger. ``config.yaml`` is created exclusively, so
    two runs that share the folder (one after the other, or at once) cannot both write it: the second stops
    with a ``FileExistsError`` saying what to change. A run that continues from one of the folder's own
    checkpoints (``ckpt_path`` inside it) writes ``config-<subcommand>-<n>.yaml`` beside the first instead.

    A ``WandbLogger`` also gets the config (:meth:`save_config`): as its run config, and the file as one of the run's
    files, ``lightning-mtl/config.yaml``. Other loggers have the file beside their checkpoints.
    """

    ckpt_path: Optional[str] = None
    """The resolved checkpoint this run starts from; :class:`~lightning_mtl.cli.MultiTaskCLI` sets it before the run."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        run_dir = trainer.strategy.broadcast(run_dir_of(trainer))
        written = self._write(run_dir, TrainerFn(stage).value) if trainer.is_global_zero else None
        if trainer.strategy.broadcast(written) is None:
            raise FileExistsError(refusal(os.path.join(run_dir, self.config_filename), run_dir))
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
        self.already_saved = True

    def _write(self, run_dir: str, command: str) -> Optional[str]:
        """Save the config under the first free name allowed in ``run_dir``; the path, or None if none is."""
        fs = get_filesystem(run_dir)
        fs.makedirs(run_dir, exist_ok=True)
        names = iter([self.config_filename])
        if self.ckpt_path is not None and is_inside(self.ckpt_path, run_dir):
            stem, suffix = os.path.splitext(self.config_filename)
            names = itertools.chain(names, (f"{stem}-{command}-{n}{suffix}" for n in itertools.count(1)))
        for name in names:
            path = os.path.join(run_dir, name)
            if claim(fs, path):
                self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=self.multifile)
                self.saved_path = path
                return path
        return None

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Rank zero, after the file is written: every ``WandbLogger`` gets the resolved config as its run config and
        the file as one of its run's files (:func:`~lightning_mtl.run_config.log_config_to_wandb`)."""
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if loggers:
            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            for logger in loggers:
                log_config_to_wandb(logger, config, getattr(self, "saved_path", None))



def refusal(config_path: str, run_dir: str) -> str:
    """Why a run may not save its config at ``config_path`` (another run's is there), and what to change."""
    return (
        f"{config_path} already exists: another run saved its config in {run_dir}, and this run's config and "
        "checkpoints would go beside it. Nothing is overwritten. Give this run its own folder: a new "
        "--trainer.default_root_dir, or a versioned logger (the default logger writes lightning_logs/version_N; "
        "with an explicit TensorBoard/CSV logger, change --trainer.logger.init_args.version or leave it unset). "
        f"To continue that run instead, pass --ckpt_path with one of its checkpoints in {run_dir}."
    )


def claim(fs, path: str) -> bool:
    """Create ``path`` empty unless it exists (atomically on a local disk); True if this call created it."""
    if isinstance(fs, LocalFileSystem):
        try:
            open(path, "x").close()
        except FileExistsError:
            return False
        return True
    return not fs.isfile(path)


def is_inside(path: str, folder: str) -> bool:
    """Whether ``path`` lies in ``folder`` (both resolved)."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())
