"""``lightning_mtl.load_run`` rebuilds a CLI run's model from its ``config.yaml`` and a checkpoint."""

import re
from pathlib import Path

import pytest
import torch

from lightning_mtl import MultiTaskModule, load_run
from lightning_mtl.balancers import PCGrad
from lightning_mtl.cli import run
from lightning_mtl.datasets import MultiDigitsDataModule
from lightning_mtl.runs import explain_load_error
from test_cli import short


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of two steps with a stateful balancer given by class_path."""
    root = tmp_path_factory.mktemp("run")
    balancer = '{"class_path": "lightning_mtl.balancers.PCGrad", "init_args": {"seed": 3}}'
    cli = run(["fit", *short(root, "--model.balancer", balancer)])
    return cli, Path(cli.trainer.checkpoint_callback.best_model_path)


def outputs(model, datamodule) -> dict[str, torch.Tensor]:
    x, _ = next(iter(datamodule.predict_dataloader()))
    model.eval()
    with torch.no_grad():
        return model(x)


def test_load_run_rebuilds_the_trained_model_from_the_runs_folder(trained):
    cli, checkpoint = trained
    folder = checkpoint.parents[1]
    model = load_run(folder)
    assert isinstance(model, MultiTaskModule) and not model.training
    assert model.task_names == ["left", "right", "sum"] and isinstance(model.balancer, PCGrad)
    assert type(model.backbone) is type(cli.model.backbone)
    expected = outputs(cli.model, cli.datamodule)
    for task, value in outputs(model, cli.datamodule).items():
        torch.testing.assert_close(value, expected[task], rtol=0, atol=0)
    torch.testing.assert_close(model.state_dict(), cli.model.state_dict(), rtol=0, atol=0)  # balancer state too


def test_load_run_takes_the_config_file_a_checkpoint_path_and_builds_the_data_module(trained):
    cli, checkpoint = trained
    folder = checkpoint.parents[1]
    by_path, datamodule = load_run(folder / "config.yaml", checkpoint=str(checkpoint), data=True)
    last = load_run(folder, checkpoint="last")
    relative = load_run(folder, checkpoint=f"checkpoints/{checkpoint.name}")
    assert isinstance(datamodule, MultiDigitsDataModule)
    (x, y), (x_run, y_run) = (next(iter(dm.predict_dataloader())) for dm in (datamodule, cli.datamodule))
    assert torch.equal(x, x_run) and all(torch.equal(y[task], y_run[task]) for task in y_run)  # the run's data
    expected = outputs(cli.model, cli.datamodule)
    for model in (by_path, last, relative):
        for task, value in outputs(model, datamodule).items():
            torch.testing.assert_close(value, expected[task], rtol=0, atol=0)


def test_best_is_the_checkpoint_the_run_recorded_as_best_even_after_the_run_moved(tmp_path):
    folder = tmp_path / "moved-run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text("model: {}\n")
    best = folder / "checkpoints" / "epoch=0-step=2.ckpt"
    torch.save({"state_dict": {}}, best)
    state = {"monitor": "val/loss", "best_model_path": "/elsewhere/run/checkpoints/epoch=0-step=2.ckpt"}
    torch.save({"callbacks": {"ModelCheckpoint{'monitor': 'val/loss'}": state}}, folder / "checkpoints" / "last.ckpt")
    from lightning_mtl.runs import _checkpoint

    assert _checkpoint(folder, "best") == best
    assert _checkpoint(folder, "last") == folder / "checkpoints" / "last.ckpt"


def test_load_run_says_what_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml not found: load_run takes a run's folder"):
        load_run(tmp_path)
    (tmp_path / "config.yaml").write_text("model: {}\n")
    with pytest.raises(FileNotFoundError, match=r"checkpoints holds no \.ckpt file"):
        load_run(tmp_path)


def load_from_checkpoint_with_the_hint(cls, checkpoint_path, *args, **kwargs):
    """The override proposed for ``MultiTaskModule.load_from_checkpoint`` (module.py), until it is there."""
    try:
        return super(MultiTaskModule, cls).load_from_checkpoint(checkpoint_path, *args, **kwargs)
    except TypeError as error:
        explain_load_error(error, checkpoint_path)
        raise


def test_load_from_checkpoint_without_backbone_and_tasks_names_load_run_and_the_exact_call(trained, monkeypatch):
    _, checkpoint = trained
    if "load_from_checkpoint" not in MultiTaskModule.__dict__:  # module.py does not have the override yet
        monkeypatch.setattr(MultiTaskModule, "load_from_checkpoint", classmethod(load_from_checkpoint_with_the_hint))
    folder = checkpoint.parents[1]
    call = f"lightning_mtl.load_run({str(folder)!r}, checkpoint={str(checkpoint)!r})"
    with pytest.raises(TypeError, match=re.escape(call)) as raised:
        MultiTaskModule.load_from_checkpoint(str(checkpoint))
    assert "missing 2 required positional arguments: 'backbone' and 'tasks'" in str(raised.value)
    # the backbone and tasks given: the ordinary path
    cli_model = load_run(folder)
    parts = dict(backbone=cli_model.backbone, tasks=cli_model.tasks, balancer=cli_model.balancer)
    model = MultiTaskModule.load_from_checkpoint(str(checkpoint), **parts)
    assert isinstance(model, MultiTaskModule)


def test_the_hint_leaves_other_type_errors_alone():
    explain_load_error(TypeError("unsupported operand type(s) for +: 'int' and 'str'"), "x.ckpt")  # returns
    with pytest.raises(TypeError, match=r"load_run\(<the run's folder, holding config.yaml>, checkpoint='x.ckpt'\)"):
        explain_load_error(TypeError("__init__() missing 1 required positional argument: 'tasks'"), "x.ckpt")
