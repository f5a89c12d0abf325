"""The ``lightning-mtl`` command's help: the descriptions of its subcommands and a formatter a person can read.

``lightning-mtl fit --help`` shows the model's options in full and Lightning's cut to their first sentence, names
the classes an option accepts briefly (the bundled backbones and balancers by name), and leaves out the
``--<option>.help`` entries, which one line of each description explains. Used by :mod:`lightning_mtl.cli`.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from jsonargparse import DefaultHelpFormatter
from torch import nn

from lightning_mtl.balancers import BALANCERS


class HelpFormatter(DefaultHelpFormatter):
    """``--help`` a person can read: the model's options in full, others cut to their first sentence, classes
    named briefly (the backbone's and balancer's from this package only), and no ``--<option>.help`` entries
    (one line of the description says how to use them)."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.option_strings and all(option.endswith(".help") for option in action.option_strings):
            return ""
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = super()._get_help_string(action)
        if not text:
            return text
        start = max(text.rfind(" (type: "), text.rfind(" (required"), text.rfind(" (default: "))
        description, details = (text[:start], text[start:]) if start >= 0 else (text, "")
        if not action.dest.startswith("model.") and action.dest != "test_after_fit":
            description = _first_sentence(description)
        details, _, known = details.partition(", known subclasses: ")
        if known:
            details += "; " + _classes(action.dest, known.rstrip(")").split(", ")) + ")"
        return description + details

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(super(HelpFormatter, self)._fill_text(part, width, indent) for part in text.split("\n\n"))


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.:])\s+(?=[A-Z`(])", text.strip(), maxsplit=1)[0]


def _classes(dest: str, paths: list[str]) -> str:
    """What an option taking a class accepts, in a few words."""
    if dest == "model.balancer":
        return f"names: {', '.join(sorted(BALANCERS))}; or a lightning_mtl.balancers class_path"
    if dest == "model.backbone":
        return "any torch.nn.Module by class_path; bundled: " + _grouped(_backbones())
    if dest == "data":
        import lightning_mtl.datasets as datasets

        bundled = [f"lightning_mtl.datasets.{name}" for name in datasets.__all__ if name.endswith("DataModule")]
        paths = [path for path in paths if path != "lightning.LightningDataModule"] + bundled
    return "known: " + _grouped(paths)


def _backbones() -> list[str]:
    import lightning_mtl.architectures as architectures

    names = []
    for name in architectures.__all__:
        cls = getattr(architectures, name)
        if isinstance(cls, type) and issubclass(cls, nn.Module) and not cls.__module__.endswith((".base", ".heads")):
            names.append(f"lightning_mtl.architectures.{name}")
    return names


def _grouped(paths: list[str]) -> str:
    """``a.b.C, a.b.D, e.F`` as ``a.b.{C, D}, e.F``."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        module, _, name = path.rpartition(".")
        groups.setdefault(module, []).append(name)
    return ", ".join(
        f"{module}.{names[0]}" if len(names) == 1 else f"{module}.{{{', '.join(names)}}}"
        for module, names in groups.items()
    )


_USE = (
    "Every option can be set in the YAML config (-c) or on the command line, later ones winning. An option that "
    "takes a class takes its class_path and init_args; --<option>.help CLASS lists a class's init_args, e.g. "
    "--model.backbone.help lightning_mtl.architectures.SmallCNN. Lightning's own options are shown with the first "
    "sentence of their documentation. More in docs/cli.md."
)
_CKPT = "Give the trained weights with --ckpt_path (a checkpoint of a run, e.g. runs/.../checkpoints/*.ckpt)."
SUMMARIES = {
    "fit": "train a multi-task model",
    "validate": "evaluate a model on the validation split, per task",
    "test": "evaluate a model on the test split, per task",
    "predict": "write each task's predictions to the run's folder",
}
DESCRIPTIONS = {
    "fit": (
        "lightning-mtl fit: train a multi-task model (a shared backbone; a head, loss and metrics per task; a "
        "balancer combining the tasks) on a data module. The run's config.yaml and checkpoints/ go to its own "
        "folder; --test_after_fit true tests the best checkpoint once training ends."
    ),
    "validate": f"lightning-mtl validate: evaluate a multi-task model on the validation split, per task. {_CKPT}",
    "test": f"lightning-mtl test: evaluate a multi-task model on the test split, per task. {_CKPT}",
    "predict": (
        "lightning-mtl predict: write each task's predictions to the run's folder, predictions/<task>.pt "
        f"(TaskPredictionWriter; a prediction writer in --trainer.callbacks replaces it). {_CKPT}"
    ),
}


def parser_kwargs() -> dict[str, Any]:
    usage = "%(prog)s [-h] [-c CONFIG] [--print_config[=flags]] [--OPTION VALUE ...]"
    kwargs: dict[str, Any] = {
        "description": (
            "lightning-mtl: train and evaluate multi-task models (lightning_mtl.MultiTaskModule) with Lightning, "
            "the whole experiment in one YAML config. See `lightning-mtl fit --help`. `lightning-mtl baselines "
            "--config X.yaml` trains one single-task model per task of X for Δm (lightning_mtl.callbacks.DeltaM); "
            "`lightning-mtl compare --config X.yaml --balancers static,uw,upgrad --seeds 3` writes a leaderboard."
        ),
        "formatter_class": HelpFormatter,
    }
    for command, description in DESCRIPTIONS.items():
        kwargs[command] = {"description": f"{description}\n\n{_USE}", "formatter_class": HelpFormatter, "usage": usage}
    return kwargs
