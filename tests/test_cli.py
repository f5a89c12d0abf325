"""The ``lightning-mtl`` command on the main job's config, in a reduced form."""

from pathlib import Path

import pytest
import torch

from lightning_mtl import MultiTaskModule
from lightning_mtl.architectures import SmallCNN
from lightning_mtl.balancers import Static
from lightning_mtl.cli import run
from lightning_mtl.datasets import MultiDigitsDataModule

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "multidigits.yaml"


def reduced(tmp_path, *extra):
    return [
        "--config", str(CONFIG),
        "--trainer.max_epochs", "2",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        "--data.init_args.train_size", "3000",
        "--data.init_args.val_size", "500",
        "--data.init_args.test_size", "500",
        *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_fit_builds_the_whole_experiment_from_yaml_and_tests_after_fit(tmp_path):
    cli = run(["fit", *reduced(tmp_path)])
    assert isinstance(cli.model, MultiTaskModule) and isinstance(cli.model.backbone, SmallCNN)
    assert cli.model.task_names == ["left", "right", "sum"]
    assert isinstance(cli.model.balancer, Static) and cli.model.tasks["sum"].weight == 0.5
    assert isinstance(cli.datamodule, MultiDigitsDataModule)
    metrics = cli.trainer.callback_metrics
    # test_after_fit ran the test split; two short epochs are far above chance (10%)
    assert metrics["test/left/accuracy"] > 0.3 and metrics["test/right/accuracy"] > 0.3
    assert torch.isfinite(metrics["test/sum/mae"])
    # LightningCLI saved the experiment's config beside the logs
    assert list(Path(tmp_path).rglob("config.yaml"))


@pytest.mark.slow
def test_command_line_overrides_and_other_subcommands(tmp_path):
    cli = run(
        ["fit", *reduced(tmp_path, "--trainer.max_epochs", "1", "--test_after_fit", "false",
                         "--model.optimizer.init_args.lr", "0.01")]
    )  # fmt: skip
    assert cli.trainer.current_epoch == 1
    assert cli.model.configure_optimizers().param_groups[0]["lr"] == 0.01
    assert not any(key.startswith("test/") for key in cli.trainer.callback_metrics)
    checkpoint = cli.trainer.checkpoint_callback.best_model_path
    validated = run(["validate", *reduced(tmp_path), "--ckpt_path", checkpoint])
    assert "val/left/accuracy" in validated.trainer.callback_metrics
    predicted = run(["predict", *reduced(tmp_path), "--ckpt_path", checkpoint, "--return_predictions", "true"])
    assert predicted.trainer.predict_loop.predictions  # one {task: prediction} per batch
    first = predicted.trainer.predict_loop.predictions[0]
    assert set(first) == {"left", "right", "sum"} and first["left"].shape[1] == 10


def test_unknown_balancer_name_is_reported(tmp_path):
    with pytest.raises(ValueError, match="unknown balancer 'nope'"):
        run(["fit", *reduced(tmp_path, "--model.balancer", "nope")])


def test_a_class_path_balancer_that_does_not_validate_names_the_cause(tmp_path):
    balancer = '{"class_path": "lightning_mtl.balancers.PCGrad", "init_args": {"sed": 3}}'  # seed misspelt
    with pytest.raises(ValueError, match="is a class_path config that did not validate.*init_args option"):
        run(["fit", *reduced(tmp_path, "--model.balancer", balancer)])


@pytest.mark.slow
def test_balancer_and_gradient_mode_from_yaml(tmp_path):
    balancer = '{"class_path": "lightning_mtl.balancers.PCGrad", "init_args": {"seed": 3}}'
    cli = run(
        ["fit", *reduced(tmp_path, "--trainer.max_epochs", "1", "--test_after_fit", "false",
                         "--trainer.limit_train_batches", "5", "--trainer.limit_val_batches", "2",
                         "--model.balancer", balancer, "--model.gradients", "representation")]
    )  # fmt: skip
    from lightning_mtl.balancers import PCGrad

    assert isinstance(cli.model.balancer, PCGrad) and cli.model.gradients == "representation"
    assert cli.trainer.global_step == 5
