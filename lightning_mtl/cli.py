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

Mistakes found at parse time, before anything is built, stop the command with a short message and no
traceback (:class:`ConfigError`): a misspelt ``--model.balancer`` name (the valid names are listed), and
Lightning's top-level ``--optimizer``/``--lr_scheduler`` (the model's own ``--model.optimizer`` and
``--model.lr_scheduler`` are the only ones; Lightning's would silently replace them).

``predict`` writes each task's predictions into the run's folder (:class:`TaskPredictionWriter`,
``<run folder>/predictions/<task>.pt``) unless the trainer already has a prediction writer.
:func:`lightning_mtl.load_run` rebuilds a run's model from its ``config.yaml`` and a checkpoint.
The help text is :mod:`lightning_mtl.cli_help`, the checkpoint checks :mod:`lightning_mtl.checkpoints`, the run
folder's config :mod:`lightning_mtl.run_folder`. See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from jsonargparse import ArgumentError, ArgumentParser
from jsonargparse.typing import import_object
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelSummary
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_mtl.balancers import BALANCERS, Balancer, check_not_abstract
from lightning_mtl.callbacks.model_summary import MultiTaskModelSummary
from lightning_mtl.callbacks.prediction_writer import TaskPredictionWriter
from lightning_mtl.callbacks.task_table import TaskTable
from lightning_mtl.checkpoints import checkpoint_damage, damaged_message  # noqa: F401 - checkpoint_damage: its old home
from lightning_mtl.cli_help import DESCRIPTIONS, SUMMARIES, HelpFormatter, parser_kwargs  # noqa: F401 - HelpFormatter: its old home
from lightning_mtl.module import MultiTaskModule
from lightning_mtl.run_config import require_wandb
from lightning_mtl.run_folder import SaveRunConfig, is_inside, refusal
from lightning_mtl.runs import run_dir as _run_dir


class ConfigError(ValueError):
    """A mistake in the command line or config, found while parsing, before anything is built.

    ``lightning-mtl`` prints the message without a traceback and exits with status 2, as for a parser error;
    :func:`run` raises it.
    """


class MultiTaskCLI(LightningCLI):
    """``LightningCLI`` for :class:`MultiTaskModule` with any ``LightningDataModule``.

    Beyond Lightning's: the model and data arguments of :func:`experiment_arguments`, ``--test_after_fit``, a
    readable ``--help`` (:class:`~lightning_mtl.cli_help.HelpFormatter`), parse-time checks (:class:`ConfigError`), checked
    ``--ckpt_path`` files, and a :class:`TaskPredictionWriter` for ``predict``.
    """

    _verified_ckpt: Optional[str] = None  # the checkpoint already checked whole, so it is read once

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        experiment_arguments(parser)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="fit only: run the test split after fit (best checkpoint)."
        )
        parser.add_argument(
            "--task_table", type=bool, default=True,
            help="print a per-task table (task, metric, value) when fit, validate or test ends (TaskTable).",
        )  # fmt: skip
        # Lightning's top-level optimizer and scheduler are not ours (auto_configure_optimizers=False); the keys stay,
        # hidden, so that configs saved before (``optimizer: null``) still load, and anything else is refused.
        for key in _LIGHTNING_OPTIMIZER_KEYS:
            parser.add_argument(f"--{key}", type=Optional[Any], default=None, help=argparse.SUPPRESS)

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        for action in self.parser._actions:
            for choice in getattr(action, "_choices_actions", ()):  # the sub-commands' one-line summaries
                choice.help = SUMMARIES.get(choice.dest, choice.help)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        for group in parser._action_groups:
            keys = {action.dest.split(".")[0] for action in group._group_actions}
            title = next((_GROUP_TITLES[key] for key in keys if key in _GROUP_TITLES), None)
            if "ckpt_path" in keys:
                title = f"{subcommand}: the checkpoint to start from, and the run"
            if title is not None:
                group.title, group.description = title, None
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse as Lightning does, then refuse what :class:`ConfigError` describes, before anything is built."""
        given = sys.argv[1:] if args is None else args
        if isinstance(given, Sequence) and not isinstance(given, str):
            for arg in given:
                match = re.fullmatch(r"--(optimizer|lr_scheduler)([.=].*)?", str(arg))
                if match:
                    raise ConfigError(_optimizer_rule(match.group(1)))
            printing = [arg for arg in given if str(arg).startswith("--print_config")]
            if printing:  # it prints and exits while parsing: check the same arguments without it first
                self.parse_arguments(parser, [arg for arg in given if arg not in printing])
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        for key in _LIGHTNING_OPTIMIZER_KEYS:
            if config.get(key) is not None:
                raise ConfigError(_optimizer_rule(key))
        check_balancer_name(config.get("model.balancer"))
        check_wandb_installed(config)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI opens an existing --ckpt_path file right after parsing (for hyper-parameters): check it first
        subcommand = self.config.get("subcommand")
        given = self.config[subcommand].get("ckpt_path") if subcommand else None
        if given and os.path.isfile(given):
            self._verify_ckpt(given, given)
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's Trainer, with the multi-task model summary in place of Lightning's and a :class:`TaskTable`.

        Lightning's own ``ModelSummary`` (added unless ``--trainer.enable_model_summary false``) becomes a
        :class:`MultiTaskModelSummary` of the same ``max_depth``, which adds shared vs per-task parameter counts; a
        ``RichModelSummary`` or a subclass given in ``--trainer.callbacks`` is kept. ``--task_table false`` leaves the
        table out, as does a ``TaskTable`` already in the callbacks (which is used instead).
        """
        trainer = super().instantiate_trainer(**kwargs)
        callbacks = trainer.callbacks
        for index, callback in enumerate(callbacks):
            if type(callback) is ModelSummary:
                callbacks[index] = MultiTaskModelSummary(max_depth=callback._max_depth, **callback._summarize_kwargs)
        wants_table = (self.config[self.subcommand] if self.subcommand else self.config).get("task_table", True)
        if wants_table and not any(isinstance(callback, TaskTable) for callback in callbacks):
            callbacks.append(TaskTable())
        return trainer

    def before_fit(self) -> None:
        self._resolve_ckpt_path()
        self._check_run_folder()

    before_validate = before_test = before_fit

    def before_predict(self) -> None:
        self._resolve_ckpt_path()
        self._check_run_folder()
        if not is_overridden("predict_dataloader", self.datamodule, LightningDataModule):
            raise ConfigError(
                f"predict: the data module {type(self.datamodule).__name__} has no predict split. Give it one: for "
                "MultiTaskDataModule, data.init_args.predict (a Dataset, or {task: Dataset} with x-only or (x, y) "
                "items); MultiDigitsDataModule predicts its test split."
            )
        callbacks = self.trainer.callbacks
        if not any(isinstance(callback, BasePredictionWriter) for callback in callbacks):
            # before SaveRunConfig: a folder that already holds predictions is refused before a config is written
            saver = next((i for i, callback in enumerate(callbacks) if isinstance(callback, SaveRunConfig)), len(callbacks))
            callbacks.insert(saver, TaskPredictionWriter())

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        callback = self.trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None)

    def _check_run_folder(self) -> None:
        """Refuse a run whose folder holds another run's ``config.yaml`` before any logger touches the folder, and
        keep the ``metrics.csv`` of a run this command continues.

        :class:`SaveRunConfig` makes the same refusal, but at setup, after Lightning has created the loggers'
        experiments, and a ``CSVLogger`` deletes the ``metrics.csv`` of the folder it opens. A command continuing the
        run in its folder (``--ckpt_path`` inside it) would lose the earlier metrics the same way: that file is
        renamed ``metrics-<n>.csv`` first, and the new command's metrics go to a fresh ``metrics.csv``.
        """
        folder = _run_dir(self.trainer)
        config_path = os.path.join(folder, "config.yaml")
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        continuing = ckpt_path is not None and is_inside(str(ckpt_path), folder)
        fs = get_filesystem(folder)
        if fs.isfile(config_path) and not continuing:
            raise FileExistsError(refusal(config_path, folder))
        if not (continuing and self.trainer.is_global_zero):
            return
        for logger in self.trainer.loggers:
            if isinstance(logger, CSVLogger):
                metrics = os.path.join(logger.log_dir, "metrics.csv")
                if fs.isfile(metrics):
                    names = (os.path.join(logger.log_dir, f"metrics-{n}.csv") for n in itertools.count(1))
                    kept = next(name for name in names if not fs.exists(name))
                    fs.mv(metrics, kept)
                    rank_zero_info(f"Kept the continued run's {metrics} as {kept}; this command's metrics go to metrics.csv.")

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
            raise ValueError(damaged_message(given, path, damage))
        self._verified_ckpt = path


def experiment_arguments(parser: LightningArgumentParser, build_model: bool = True, data: bool = True) -> None:
    """The ``model`` and ``data`` arguments of every sub-command (what Lightning's ``add_lightning_class_args`` adds
    for them). :func:`lightning_mtl.load_run` reads a run's config with these same definitions, ``build_model=False``
    leaving the model as its constructor's arguments (for ``load_from_checkpoint``)."""
    parser.add_class_arguments(MultiTaskModule, "model", fail_untyped=False, instantiate=build_model, sub_configs=True)
    if data:
        parser.add_lightning_class_args(LightningDataModule, "data", subclass_mode=True)


def check_balancer_name(balancer: Any) -> None:
    """Refuse a ``--model.balancer`` string that is no registered name (case-insensitive), listing the valid ones.

    A ``class_path`` config arrives here as a string only when it did not validate; it is refused with the reason.
    """
    class_path = getattr(balancer, "class_path", None)
    if isinstance(class_path, str):
        try:
            check_not_abstract(import_object(class_path))
        except TypeError as error:
            raise ConfigError(f"--model.balancer: {error}") from None
    if not isinstance(balancer, str) or balancer.lower() in BALANCERS:
        return
    if "class_path" in balancer or balancer.lstrip().startswith("{"):
        raise ConfigError(f"--model.balancer: {balancer!r} did not validate: {_class_path_problem(balancer)}")
    close = difflib.get_close_matches(balancer.lower(), list(BALANCERS), n=1)
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"--model.balancer: unknown balancer {balancer!r}{guess}. Valid names (case-insensitive): "
        f"{', '.join(sorted(BALANCERS))}; or a class_path with init_args, e.g. "
        "--model.balancer '{class_path: lightning_mtl.balancers.UPGrad}'."
    )


def _class_path_problem(balancer: str) -> str:
    """Why a ``class_path`` balancer config does not validate, as the parser says it for one in a YAML file."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--balancer", type=Balancer)
    try:
        parser.parse_args(["--balancer", balancer])
    except ArgumentError as error:
        return " ".join(str(error).split())
    return "unknown reason"


def check_wandb_installed(config: Any) -> None:
    """Refuse a config naming a Weights & Biases class (``--trainer.logger WandbLogger``) when wandb cannot be imported,
    with the install hint, before anything is built."""
    for key, class_path in _wandb_class_paths(config):
        try:
            require_wandb(f"--{key} {class_path}")
        except ImportError as error:
            raise ConfigError(str(error)) from None


def _wandb_class_paths(value: Any, key: str = "") -> list[tuple[str, str]]:
    """``(option, class_path)`` of every ``class_path`` in a parsed config that names a W&B class."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    found: list[tuple[str, str]] = []
    if isinstance(value, Mapping):
        class_path = value.get("class_path")
        if isinstance(class_path, str) and "wandb" in class_path.lower():
            found.append((key, class_path))
        for name, item in value.items():
            found += _wandb_class_paths(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found += _wandb_class_paths(item, f"{key}[{index}]")
    return found


_LIGHTNING_OPTIMIZER_KEYS = ("optimizer", "lr_scheduler")

_GROUP_TITLES = {
    "trainer": "trainer: Lightning's Trainer (devices, epochs, precision, logger, callbacks)",
    "model": "model: the multi-task model, lightning_mtl.MultiTaskModule (a shared backbone, one head per task)",
    "data": "data: any LightningDataModule, by class_path",
}

def _optimizer_rule(key: str) -> str:
    example = {
        "optimizer": "--model.optimizer torch.optim.SGD --model.optimizer.lr 0.1",
        "lr_scheduler": "--model.lr_scheduler torch.optim.lr_scheduler.StepLR --model.lr_scheduler.step_size 10",
    }[key]
    monitor = "; a ReduceLROnPlateau there monitors val/loss" if key == "lr_scheduler" else ""
    return (
        f"the top-level --{key} (or {key}: at the top of a config) is refused: the {key} belongs to the model, and "
        f"Lightning's top-level one would replace the model's without a word. Use --model.{key} "
        f"(e.g. {example}{monitor}), or put {key}: under model: in the YAML config."
    )


def run(args: Optional[Sequence[str]] = None) -> MultiTaskCLI:
    """Run the CLI on ``args`` (default ``sys.argv[1:]``) and return it, trainer and model included."""
    return MultiTaskCLI(
        MultiTaskModule,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_callback=SaveRunConfig,
        auto_configure_optimizers=False,
        parser_kwargs=parser_kwargs(),
        args=list(args) if args is not None else None,
    )


def main() -> None:
    """Entry point of the ``lightning-mtl`` console script."""
    if sys.argv[1:2] in (["baselines"], ["compare"]):
        from lightning_mtl.commands import main as experiments

        experiments(sys.argv[1:])
    else:
        try:
            run()
        except ConfigError as error:
            command = next((arg for arg in sys.argv[1:] if arg in DESCRIPTIONS), "")
            sys.stderr.write(f"lightning-mtl{' ' + command if command else ''}: error: {error}\n")
            sys.exit(2)
    end_process_group()


def end_process_group() -> None:
    """Destroy the process group a finished DDP run leaves behind.

    Lightning keeps it alive after ``fit``; a process that exits with it alive can be aborted by a gloo worker
    thread during interpreter shutdown ("terminate called without an active exception", exit status -6), so a
    job scheduler sees a run that finished as failed. Called only after a run that succeeded: destroying it after
    an error, while other ranks may still be in a collective, can hang.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    main()
