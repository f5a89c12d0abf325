"""The ``lightning-mtl`` command: Lightning's ``LightningCLI`` around :class:`MultiTaskModule`.

The whole experiment is one YAML file: ``model`` (backbone, tasks with head/loss/metrics/weight,
balancer, optimizer), ``data`` (any ``LightningDataModule``, by ``class_path``) and ``trainer``.
Sub-commands are Lightning's: ``fit``, ``validate``, ``test``, ``predict``; any option can be
overridden on the command line, e.g. ``--trainer.max_epochs 3``.

One option is added to ``fit``: ``--test_after_fit true`` evaluates the test split once training
ends, with the best checkpoint when a ``ModelCheckpoint`` monitors a metric, else the last weights.

Each run's config is saved in the run's own folder, the one holding its ``checkpoints/``
(``<default_root_dir>/lightning_logs/version_N/config.yaml`` with the default logger), and is never
overwritten (:class:`SaveRunConfig`): a run that would write where another run's ``config.yaml``
already is — ``--trainer.logger false`` or a fixed logger version in a used folder, or two runs that
raced for the same version — stops before training with a ``FileExistsError`` that names the file and
what to change. A command that continues the run in that folder (``--ckpt_path`` one of its
checkpoints) saves its config beside it as ``config-<subcommand>-<n>.yaml``.

``--ckpt_path`` (a path, or ``last``/``best``, resolved as Lightning resolves them) is checked before
anything runs: a truncated or damaged checkpoint stops the command with a ``ValueError`` naming the
file and the intact checkpoints in its folder, newest first. The CLI never falls back to another
checkpoint by itself: that would resume from a different step without saying so.
"""

from __future__ import annotations

import itertools
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerFn

from lightning_mtl.module import MultiTaskModule


class SaveRunConfig(SaveConfigCallback):
    """Saves the config in the run's own folder, beside its ``checkpoints/``; never over an existing file.

    The folder is the one Lightning's ``ModelCheckpoint`` derives for the run: ``<save_dir>/<name>/<version>``
    of the first logger, or ``default_root_dir`` without a logger. ``config.yaml`` is created exclusively, so
    two runs that share the folder (one after the other, or at once) cannot both write it: the second stops
    with a ``FileExistsError`` saying what to change. A run that continues from one of the folder's own
    checkpoints (``ckpt_path`` inside it) writes ``config-<subcommand>-<n>.yaml`` beside the first instead.
    """

    ckpt_path: Optional[str] = None
    """The resolved checkpoint this run starts from; :class:`MultiTaskCLI` sets it before the run."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        run_dir = trainer.strategy.broadcast(_run_dir(trainer))
        written = self._write(run_dir, TrainerFn(stage).value) if trainer.is_global_zero else None
        if trainer.strategy.broadcast(written) is None:
            raise FileExistsError(_refusal(os.path.join(run_dir, self.config_filename), run_dir))
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
        self.already_saved = True

    def _write(self, run_dir: str, command: str) -> Optional[str]:
        """Save the config under the first free name allowed in ``run_dir``; the path, or None if none is."""
        fs = get_filesystem(run_dir)
        fs.makedirs(run_dir, exist_ok=True)
        names = iter([self.config_filename])
        if self.ckpt_path is not None and _is_inside(self.ckpt_path, run_dir):
            stem, suffix = os.path.splitext(self.config_filename)
            names = itertools.chain(names, (f"{stem}-{command}-{n}{suffix}" for n in itertools.count(1)))
        for name in names:
            path = os.path.join(run_dir, name)
            if _claim(fs, path):
                self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=self.multifile)
                return path
        return None


class MultiTaskCLI(LightningCLI):
    """``LightningCLI`` for :class:`MultiTaskModule` with any ``LightningDataModule``."""

    _verified_ckpt: Optional[str] = None  # the checkpoint already checked whole, so it is read once

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="fit only: run the test split after fit (best checkpoint)."
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI opens an existing --ckpt_path file right after parsing (for hyper-parameters): check it first
        subcommand = self.config.get("subcommand")
        given = self.config[subcommand].get("ckpt_path") if subcommand else None
        if given and os.path.isfile(given):
            self._verify_ckpt(given, given)
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        self._resolve_ckpt_path()

    before_validate = before_test = before_predict = before_fit

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        callback = self.trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None)

    def _resolve_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path`` as the Trainer will, refuse a damaged file, and pass the path on."""
        config = self.config_init[self.subcommand]
        given = config.get("ckpt_path")
        if given is None:
            return
        # Lightning's own resolution of "last", "best", "hpc" and registry names (it warns if "last" finds none)
        path = self.trainer._checkpoint_connector._select_ckpt_path(
            TrainerFn(self.subcommand), given, model_provided=True, model_connected=False
        )
        if path is not None:
            path = str(path)
            self._verify_ckpt(given, path)
        config["ckpt_path"] = path  # the Trainer loads exactly the file checked here
        for callback in self.trainer.callbacks:
            if isinstance(callback, SaveRunConfig):
                callback.ckpt_path = path

    def _verify_ckpt(self, given: str, path: str) -> None:
        if path == self._verified_ckpt:
            return
        damage = checkpoint_damage(path)
        if damage is not None:
            raise ValueError(_damaged(given, path, damage))
        self._verified_ckpt = path


def checkpoint_damage(path: str) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be loaded (truncated or corrupt zip archive), or None if it looks whole.

    ``torch.save`` writes a zip archive whose central directory comes last, so a truncated file lacks it (reading
    the directory is cheap; the members are not read). A missing file or one in torch's legacy (non-zip) format is
    left to ``torch.load``.
    """
    fs = get_filesystem(path)
    if not fs.isfile(path):
        return None
    with fs.open(path, "rb") as file:
        if file.read(4) != b"PK\x03\x04":
            return None
        file.seek(0)
        try:
            with zipfile.ZipFile(file):
                pass
        except (zipfile.BadZipFile, EOFError, OSError) as error:
            return f"it starts as a zip archive but is incomplete ({error}); probably cut short while written or copied"
    # Member CRCs are not checked: torch.serialization.set_crc32_options(False) writes intact files without them.
    return None


def _intact_siblings(path: str, limit: int = 3) -> list[str]:
    """Up to ``limit`` intact ``.ckpt`` files in ``path``'s folder other than ``path``, newest first."""
    folder = os.path.dirname(path)
    fs = get_filesystem(folder)
    name = os.path.basename(path)
    others = [p for p in fs.ls(folder, detail=False) if p.endswith(".ckpt") and os.path.basename(p) != name]
    intact = []
    for other in sorted(others, key=fs.modified, reverse=True):
        candidate = os.path.join(folder, os.path.basename(other))
        if checkpoint_damage(candidate) is None:
            intact.append(candidate)
            if len(intact) == limit:
                break
    return intact


def _damaged(given: str, path: str, damage: str) -> str:
    intact = _intact_siblings(path)
    source = f"--ckpt_path {given!r} resolves to {path}" if given != path else f"--ckpt_path {path}"
    advice = (
        f"Intact checkpoints in {os.path.dirname(path)}, newest first: {', '.join(intact)}. Pass one with --ckpt_path."
        if intact
        else f"No intact checkpoint was found in {os.path.dirname(path)}."
    )
    return (
        f"{source}, which cannot be loaded: {damage}. {advice} (The CLI does not pick another checkpoint by itself: "
        "resuming from a different step without saying so would be wrong.)"
    )


def _refusal(config_path: str, run_dir: str) -> str:
    return (
        f"{config_path} already exists: another run saved its config in {run_dir}, and this run's config and "
        "checkpoints would go beside it. Nothing is overwritten. Give this run its own folder: a new "
        "--trainer.default_root_dir, or a versioned logger (the default logger writes lightning_logs/version_N; "
        "with an explicit TensorBoard/CSV logger, change --trainer.logger.init_args.version or leave it unset). "
        f"To continue that run instead, pass --ckpt_path with one of its checkpoints in {run_dir}."
    )


def _run_dir(trainer: Trainer) -> str:
    """The folder of this run's ``checkpoints/``, derived as Lightning's ``ModelCheckpoint`` derives it."""
    if not trainer.loggers:
        return str(trainer.default_root_dir)
    logger = trainer.loggers[0]
    save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return os.path.join(save_dir, str(logger.name), version)


def _claim(fs, path: str) -> bool:
    """Create ``path`` empty unless it exists (atomically on a local disk); True if this call created it."""
    if isinstance(fs, LocalFileSystem):
        try:
            open(path, "x").close()
        except FileExistsError:
            return False
        return True
    return not fs.isfile(path)


def _is_inside(path: str, folder: str) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def run(args: Optional[Sequence[str]] = None) -> MultiTaskCLI:
    """Run the CLI on ``args`` (default ``sys.argv[1:]``) and return it, trainer and model included."""
    return MultiTaskCLI(
        MultiTaskModule,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_callback=SaveRunConfig,
        args=list(args) if args is not None else None,
    )


def main() -> None:
    """Entry point of the ``lightning-mtl`` console script."""
    run()


if __name__ == "__main__":  # pragma: no cover
    main()
