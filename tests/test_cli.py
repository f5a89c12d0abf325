"""The ``lightning-mtl`` command on the main job's config, in a reduced form."""

import re
import sys
import uuid
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.loggers import Logger

from lightning_mtl import MultiTaskModule
from lightning_mtl.architectures import SmallCNN, parameter_counts
from lightning_mtl.balancers import Static
from lightning_mtl.callbacks import MultiTaskModelSummary, TaskTable
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


def short(tmp_path, *extra):
    """Two training steps on a small data set: enough for a run that writes its config and a checkpoint."""
    return reduced(
        tmp_path, "--trainer.max_epochs", "1", "--test_after_fit", "false",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
        "--data.init_args.train_size", "256", "--data.init_args.val_size", "64", "--data.init_args.test_size", "64",
        *extra,
    )  # fmt: skip


class RunIdLogger(Logger):
    """Lays out runs as ``WandbLogger`` does: every run shares ``save_dir``; a fresh id is its version."""

    def __init__(self, save_dir: str) -> None:
        super().__init__()
        self._save_dir, self._id = save_dir, uuid.uuid4().hex[:8]

    name = property(lambda self: "project")
    version = property(lambda self: self._id)
    save_dir = property(lambda self: self._save_dir)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        pass


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
    with pytest.raises(ValueError, match="did not validate.*Option 'sed' is not accepted"):
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


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["default", "run id"])
def test_runs_sharing_a_root_dir_keep_their_own_config_beside_their_checkpoints(tmp_path, logger):
    logger_args = []
    if logger == "run id":
        spec = f'{{"class_path": "{__name__}.RunIdLogger", "init_args": {{"save_dir": "{tmp_path}"}}}}'
        logger_args = ["--trainer.logger", spec]
    first = run(["fit", *short(tmp_path, *logger_args)])
    first_dir = Path(first.trainer.checkpoint_callback.best_model_path).parents[1]
    first_config = (first_dir / "config.yaml").read_bytes()
    second = run(["fit", *short(tmp_path, *logger_args, "--model.optimizer.init_args.lr", "0.01")])
    second_dir = Path(second.trainer.checkpoint_callback.best_model_path).parents[1]
    assert second_dir != first_dir
    assert (first_dir / "config.yaml").read_bytes() == first_config
    assert "lr: 0.01" in (second_dir / "config.yaml").read_text() and b"lr: 0.01" not in first_config


@pytest.mark.slow
def test_a_run_never_writes_over_another_runs_config_and_a_resumed_run_saves_its_own(tmp_path):
    unversioned = ("--trainer.logger", "false")  # every run of this root writes to the root itself
    first = run(["fit", *short(tmp_path, *unversioned)])
    config = tmp_path / "config.yaml"
    saved = config.read_bytes()
    refusal = rf"{re.escape(str(config))} already exists.*--trainer.default_root_dir.*init_args.version"
    with pytest.raises(FileExistsError, match=refusal):
        run(["fit", *short(tmp_path, *unversioned, "--model.optimizer.init_args.lr", "0.01")])
    assert config.read_bytes() == saved
    checkpoint = first.trainer.checkpoint_callback.best_model_path
    resumed = run(["fit", *short(tmp_path, *unversioned, "--trainer.max_epochs", "2", "--ckpt_path", checkpoint)])
    assert resumed.trainer.global_step == 4  # two steps restored, two more trained
    assert config.read_bytes() == saved
    assert f"ckpt_path: {checkpoint}" in (tmp_path / "config-fit-1.yaml").read_text()


@pytest.mark.slow
def test_a_truncated_checkpoint_is_named_with_the_intact_ones_to_use_instead(tmp_path):
    unversioned = ("--trainer.logger", "false")
    intact = Path(run(["fit", *short(tmp_path, *unversioned)]).trainer.checkpoint_callback.best_model_path)
    content = intact.read_bytes()
    last = intact.with_name("last.ckpt")
    last.write_bytes(content[: len(content) // 2])  # the newest checkpoint, cut short
    named = rf"{re.escape(str(last))}, which cannot be loaded.*newest first: {re.escape(str(intact))}\. Pass one"
    for command, given in [("fit", "last"), ("validate", str(last))]:
        with pytest.raises(ValueError, match=named):
            run([command, *short(tmp_path, *unversioned, "--ckpt_path", given)])


def test_checkpoint_check_accepts_files_saved_without_crc_and_names_truncated_ones(tmp_path):
    import torch

    from lightning_mtl.cli import checkpoint_damage

    path = tmp_path / "no-crc.ckpt"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"weights": torch.randn(1000)}, path)
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.load(path)["weights"].shape == (1000,)
    assert checkpoint_damage(str(path)) is None  # intact, CRCs or not
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "incomplete" in checkpoint_damage(str(truncated))


def test_a_misspelt_balancer_name_stops_the_command_at_parse_time_listing_the_valid_names(tmp_path):
    import subprocess
    import sys

    from lightning_mtl.balancers import BALANCERS

    command = [sys.executable, "-m", "lightning_mtl.cli", "fit", "--config", str(CONFIG),
               "--trainer.default_root_dir", str(tmp_path), "--model.balancer", "upgrade"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "Traceback" not in output and len(output.strip().splitlines()) <= 3
    assert "unknown balancer 'upgrade' (did you mean 'upgrad'?)" in result.stderr
    assert all(name in result.stderr for name in BALANCERS)
    assert "Seed set" not in output and not list(tmp_path.iterdir())  # refused before anything was built


def test_balancer_names_are_checked_case_insensitively_and_class_paths_pass():
    from jsonargparse import Namespace

    from lightning_mtl.cli import ConfigError, check_balancer_name

    for accepted in ("upgrad", "UPGrad", "PCGRAD", None, Namespace(class_path="lightning_mtl.balancers.MGDA")):
        check_balancer_name(accepted)
    with pytest.raises(ConfigError, match="unknown balancer 'famo2' \\(did you mean 'famo'\\?\\)"):
        check_balancer_name("famo2")


@pytest.mark.parametrize(
    "args, key",
    [(["--optimizer", "torch.optim.SGD"], "optimizer"), (["--optimizer=SGD", "--optimizer.lr=0.1"], "optimizer"),
     (["--optimizer.lr", "0.1"], "optimizer"), (["--lr_scheduler", "StepLR"], "lr_scheduler"),
     ("yaml", "optimizer")],
)  # fmt: skip
def test_lightnings_top_level_optimizer_is_refused_naming_the_model_option(tmp_path, args, key):
    if args == "yaml":  # a top-level key in a config file
        config = tmp_path / "top-level-optimizer.yaml"
        config.write_text("optimizer:\n  class_path: torch.optim.SGD\n  init_args: {lr: 0.1}\n")
        args = ["--config", str(config)]
    refusal = rf"the top-level --{key} .* is refused: the {key} belongs to the model.* Use --model\.{key} \(e\.g\."
    with pytest.raises(ValueError, match=refusal):
        run(["fit", *short(tmp_path, *args)])
    assert not list(tmp_path.rglob("*.ckpt"))


def test_the_models_optimizer_and_scheduler_are_the_ones_used(tmp_path):
    scheduler = ["--model.lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--model.lr_scheduler.step_size", "7"]
    optimizer = ["--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.1"]
    cli = run(["fit", *short(tmp_path, *optimizer, *scheduler)])
    (optimizer,) = cli.trainer.optimizers
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.1
    (config,) = cli.trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.StepLR) and config.scheduler.step_size == 7


def test_a_config_saved_with_lightnings_null_optimizer_keys_still_loads(tmp_path, capsys):
    old = tmp_path / "old-run-config.yaml"  # runs saved before the keys were refused hold them as null
    old.write_text("optimizer: null\nlr_scheduler: null\n")
    with pytest.raises(SystemExit) as exit_:
        run(["fit", "--config", str(CONFIG), "--config", str(old), "--print_config"])
    assert exit_.value.code == 0 and "balancer: static" in capsys.readouterr().out


def test_fit_prints_the_multi_task_summary_and_the_per_task_table(tmp_path, capsys):
    cli = run(["fit", *short(tmp_path, "--trainer.enable_model_summary", "true")])
    assert any(isinstance(callback, MultiTaskModelSummary) for callback in cli.trainer.callbacks)
    assert not any(type(callback) is ModelSummary for callback in cli.trainer.callbacks)
    out = capsys.readouterr().out
    counts = parameter_counts(cli.model)
    for part in ("shared", "task left", "task right", "task sum"):
        count = counts[part.removeprefix("task ")]
        assert re.search(rf"^{part}\s+{count:,}\s+{count:,}\s", out, re.MULTILINE), part
    table = TaskTable().rows(cli.trainer, "val")
    assert [(task, metric) for task, metric, _ in table][:2] == [("left", "loss"), ("left", "accuracy")]
    for task, metric, value in table:
        assert re.search(rf"^{task or '[(]all[)]'}\s+{metric}\s+{value:.4g}", out, re.MULTILINE), (task, metric)


def test_the_summary_and_table_can_be_switched_off(tmp_path, capsys):
    cli = run(["fit", *short(tmp_path, "--trainer.enable_model_summary", "false", "--task_table", "false")])
    assert not any(isinstance(callback, (ModelSummary, TaskTable)) for callback in cli.trainer.callbacks)
    out = capsys.readouterr().out
    assert "task left" not in out and "Per-task" not in out


def _one_process_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)


def test_main_destroys_the_process_group_a_finished_ddp_run_leaves(tmp_path, monkeypatch):
    # Lightning keeps the group alive after fit; exiting with it alive can abort in gloo's threads (rc -6)
    import lightning_mtl.cli as cli

    monkeypatch.setattr(cli, "run", lambda: _one_process_group(tmp_path))
    monkeypatch.setattr(sys, "argv", ["lightning-mtl", "fit"])
    cli.main()
    assert not torch.distributed.is_initialized()


def test_main_leaves_the_process_group_alone_after_a_failed_run(tmp_path, monkeypatch):
    # destroying it while other ranks may still be in a collective can hang: the error must propagate as it is
    import lightning_mtl.cli as cli

    def failing_run():
        _one_process_group(tmp_path)
        raise RuntimeError("a rank failed")

    monkeypatch.setattr(cli, "run", failing_run)
    monkeypatch.setattr(sys, "argv", ["lightning-mtl", "fit"])
    try:
        with pytest.raises(RuntimeError, match="a rank failed"):
            cli.main()
        assert torch.distributed.is_initialized()
    finally:
        torch.distributed.destroy_process_group()


def test_checkpoint_checks_keep_their_old_import_path():
    from lightning_mtl import checkpoints, cli

    assert cli.checkpoint_damage is checkpoints.checkpoint_damage


def test_save_run_config_keeps_its_old_import_path():
    from lightning.pytorch.cli import SaveConfigCallback

    from lightning_mtl import cli, run_folder

    assert cli.SaveRunConfig is run_folder.SaveRunConfig
    assert issubclass(run_folder.SaveRunConfig, SaveConfigCallback)
