"""``lightning-mtl fit --help`` is short enough to read and says what each model option does."""

import os
import re
import subprocess
import sys

import pytest

from lightning_mtl.balancers import BALANCERS

#: ``fit --help`` at 80 columns was 1,150 lines (every nn.Module listed for the backbone); it is about 300 now.
#: The bound leaves room for a few more options or classes, not for whole class lists again.
MAX_HELP_LINES = 330


def _help_of(command: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_mtl.cli", command, "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "80"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def fit_help() -> str:
    return _help_of("fit")


def entry(help_text: str, option: str) -> str:
    """The help entry of ``option``: its line and the indented lines under it."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"  {re.escape(option)}[ ,]", line))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(" " * 24):
            break
        block.append(line)
    return " ".join(part.strip() for part in block)


def test_fit_help_is_short_and_says_what_the_command_is_for(fit_help):
    lines = fit_help.splitlines()
    assert len(lines) <= MAX_HELP_LINES, f"fit --help has {len(lines)} lines"
    description = " ".join(fit_help.split("\n\n")[1].split())
    assert description.startswith("lightning-mtl fit: train a multi-task model")
    assert "docs/cli.md" in fit_help and "--<option>.help CLASS" in fit_help


def test_every_model_option_has_a_help_text(fit_help):
    for option in ("--model.backbone", "--model.tasks", "--model.balancer", "--model.optimizer",
                   "--model.lr_scheduler", "--model.nonfinite_loss", "--model.gradients"):  # fmt: skip
        text = entry(fit_help, option)
        described = text.split(option, 1)[1].split("(type:")[0].split("(required")[0]
        assert len(described.split()) >= 5, f"{option} has no help text: {text!r}"
    gradients = entry(fit_help, "--model.gradients")
    assert '"parameters"' in gradients and '"representation"' in gradients


def test_class_options_list_what_applies_and_no_more(fit_help):
    assert "torchjd" not in fit_help  # its aggregators are nn.Modules: they were offered as backbones
    backbone = entry(fit_help, "--model.backbone")
    assert "torch.nn.Module" in backbone and "SmallCNN" in backbone and "MMoE" in backbone
    assert "Linear" not in backbone and "MultiTaskModule" not in backbone and "lightning_mtl.balancers" not in backbone
    balancer = entry(fit_help, "--model.balancer")
    assert all(re.search(rf"\b{name}\b", balancer) for name in BALANCERS)
    for base in ("balancers.Balancer", "GramianBalancer", "GradientBalancer", "NonlinearScalarization", "MaskedScalarizer"):
        assert base not in balancer  # abstract bases: not something to choose
    # the per-class help options are described once, in the description, not listed 20 times
    assert not re.search(r"^  --\S+\.help", fit_help, flags=re.MULTILINE)


def test_top_level_help_says_what_each_command_does(capsys):
    from lightning_mtl.cli import run

    with pytest.raises(SystemExit) as exit_:
        run(["--help"])
    assert exit_.value.code == 0
    listing = " ".join(capsys.readouterr().out.split())
    assert "fit train a multi-task model" in listing
    assert "predict write each task's predictions to the run's folder" in listing


def test_names_moved_out_of_cli_and_task_affinity_still_import_from_there():
    from lightning_mtl import cli, cli_help
    from lightning_mtl.callbacks import task_affinity, task_grouping

    assert cli.HelpFormatter is cli_help.HelpFormatter
    for name in ("task_groups", "grouping_score", "TaskGrouping", "MAX_SEARCH_NODES"):
        assert getattr(task_affinity, name) is getattr(task_grouping, name)
