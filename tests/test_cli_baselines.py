"""``lightning-mtl baselines``: one single-task model per task from the multi-task config, written for DeltaM."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_mtl.baselines import read_baselines
from lightning_mtl.cli import run
from lightning_mtl.commands import CommandError, resolved_config, single_task_config, train_baselines

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "multidigits.yaml"
PER_TASK = ROOT / "examples" / "configs" / "multidigits_per_task.yaml"


def reduced(tmp_path: Path) -> list[str]:
    return [
        "--config", str(CONFIG),
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(tmp_path / "runs"),
        "--data.init_args.train_size", "192", "--data.init_args.val_size", "64", "--data.init_args.test_size", "64",
        "--model.backbone.init_args.channels", "[4, 8]",
    ]  # fmt: skip


@pytest.mark.slow
def test_baselines_are_single_task_runs_of_the_same_config_and_deltam_reads_them(tmp_path: Path) -> None:
    args = reduced(tmp_path)
    path = train_baselines(args, str(tmp_path / "baselines.json"))
    baselines = read_baselines(path)
    assert set(baselines.metrics) == {"val", "test"}
    assert set(baselines.metrics["test"]) == {"left", "right", "sum"}
    assert set(baselines.metrics["test"]["left"]) == {"loss", "accuracy"} and set(baselines.metrics["test"]["sum"]) == {"loss", "mae"}
    assert baselines.directions["left/accuracy"] == "max" and baselines.directions["sum/mae"] == "min"
    # The 'sum' baseline is the same run as a one-task fit of the config by hand (same seed, data and budget).
    single = single_task_config(resolved_config(args), "sum", str(tmp_path / "by_hand"))
    assert [t["init_args"]["name"] for t in single["model"]["tasks"]] == ["sum"]
    assert single["model"]["tasks"][0]["init_args"]["weight"] == 1.0 and single["data"]["init_args"]["tasks"] == ["sum"]
    config = tmp_path / "sum.yaml"
    config.write_text(yaml.safe_dump(single))
    cli = run(["fit", "--config", str(config)])
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
    assert baselines.metrics["test"]["sum"]["mae"] == pytest.approx(float(cli.trainer.callback_metrics["test/sum/mae"]), rel=1e-6)
    # The multi-task run with DeltaM against that file logs test/delta_m.
    multi = run(["fit", *args, "--trainer.callbacks+=lightning_mtl.callbacks.DeltaM", f"--trainer.callbacks.baselines={path}",
                 "--test_after_fit", "true"])
    assert torch.isfinite(multi.trainer.callback_metrics["test/delta_m"])


@pytest.mark.slow
def test_a_config_selecting_by_delta_m_trains_its_baselines_on_their_validation_loss(tmp_path: Path) -> None:
    # the documented config: DeltaM with its file, ModelCheckpoint and EarlyStopping on val/delta_m
    extra = tmp_path / "delta_m.yaml"
    extra.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lightning_mtl.callbacks.DeltaM", "init_args": {"baselines": str(tmp_path / "baselines.json")}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"monitor": "val/delta_m", "mode": "max"}},
        {"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_args": {"monitor": "val/delta_m", "mode": "max"}},
    ]}}))  # fmt: skip
    args = [*reduced(tmp_path), "--config", str(extra)]
    single = single_task_config(resolved_config(args), "left", str(tmp_path))
    monitors = [(c["class_path"].rsplit(".", 1)[-1], c["init_args"]["monitor"], c["init_args"]["mode"]) for c in single["trainer"]["callbacks"]]
    assert monitors == [("ModelCheckpoint", "val/loss", "min"), ("EarlyStopping", "val/loss", "min")]
    path = train_baselines(args)  # the file named by the config's DeltaM
    assert set(read_baselines(path).metrics["val"]) == {"left", "right", "sum"}


def test_a_callback_monitoring_one_tasks_metric_monitors_val_loss_in_the_other_tasks_baselines(tmp_path: Path) -> None:
    """``val/left/accuracy`` is logged by the baseline of ``left`` (kept) but by no other (the run would stop with
    Lightning's 'could not find the monitored key' after its first epoch)."""
    config = resolved_config(["--config", str(CONFIG)])
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"monitor": "val/left/accuracy", "mode": "max"}},
        {"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_args": {"monitor": "val/loss", "mode": "min"}},
    ]  # fmt: skip

    def monitors(task):
        return [(c["init_args"]["monitor"], c["init_args"]["mode"]) for c in single_task_config(config, task, str(tmp_path))["trainer"]["callbacks"]]

    assert monitors("left") == [("val/left/accuracy", "max"), ("val/loss", "min")]
    assert monitors("right") == [("val/loss", "min"), ("val/loss", "min")]
    assert monitors("sum") == [("val/loss", "min"), ("val/loss", "min")]


def test_per_task_data_is_restricted_to_the_task_with_its_batch_size(tmp_path: Path) -> None:
    config = resolved_config(["--config", str(PER_TASK), "--data.init_args.batch_size", "{left: 8, right: 8, sum: 4}"])
    single = single_task_config(config, "sum", str(tmp_path))
    data = single["data"]["init_args"]
    assert list(data["train"]) == ["sum"] and list(data["val"]) == ["sum"] and list(data["test"]) == ["sum"]
    assert data["batch_size"] == {"sum": 4}
    assert single["trainer"]["default_root_dir"] == str(tmp_path / "baselines" / "sum")


def test_baselines_train_with_static_weights_and_without_a_meta_split(tmp_path: Path) -> None:
    config = resolved_config(["--config", str(PER_TASK), "--model.balancer", "nashmtl"])
    config["data"]["init_args"]["meta"] = dict(config["data"]["init_args"]["val"])
    single = single_task_config(config, "left", str(tmp_path))
    assert single["model"]["balancer"] == "static"
    assert single["data"]["init_args"]["meta"] is None
    assert list(single["data"]["init_args"]["train"]) == ["left"]


def test_a_data_module_that_cannot_be_restricted_is_refused_naming_it(tmp_path: Path) -> None:
    config = resolved_config(["--config", str(CONFIG)])
    config["data"] = {"class_path": "my.SharedData", "init_args": {"root": "x"}}
    with pytest.raises(CommandError, match=r"'my.SharedData' to task 'left'.*`tasks` argument"):
        single_task_config(config, "left", str(tmp_path))


def test_without_an_output_or_a_deltam_in_the_config_the_command_says_what_to_add(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_mtl.cli", "baselines", "--config", str(CONFIG)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--output" in result.stderr and "DeltaM" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_compare_writes_a_leaderboard_of_every_balancer_over_seeds(tmp_path: Path) -> None:
    from lightning_mtl.commands import compare_balancers

    args = [*reduced(tmp_path), "--trainer.limit_train_batches", "8", "--data.init_args.train_size", "512"]  # 5 warm-up steps
    board = compare_balancers(args, ["static", "uw"], [0, 1], str(tmp_path / "board"))
    assert board["reference"] == "static" and list(board["rows"]) == ["static", "uw"]
    static = board["rows"]["static"]
    assert static["step_time_ratio"] == 1.0 and static["median_step_seconds"] > 0
    accuracy = static["metrics"]["test/left/accuracy"]
    assert accuracy["n"] == 2
    # each seed's value is the one its run folder's test gave: rerun seed 1 by hand
    cli = run(["fit", *args, "--model.balancer", "static", "--seed_everything", "1", "--test_after_fit", "true",
               "--trainer.default_root_dir", str(tmp_path / "by_hand")])
    seed1 = float(cli.trainer.callback_metrics["test/left/accuracy"])
    seed0 = 2 * accuracy["mean"] - seed1
    assert accuracy["std"] == pytest.approx(abs(seed0 - seed1) / 2**0.5, abs=1e-6)
    table = (tmp_path / "board" / "leaderboard.md").read_text()
    assert table.splitlines()[0].startswith("| balancer | left/accuracy | left/loss |")
    assert f"{accuracy['mean']:.4g} ± {accuracy['std']:.2g}" in table
    assert (tmp_path / "board" / "leaderboard.json").exists()


def test_compare_refuses_a_misspelt_balancer_before_training(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_mtl.cli", "compare", "--config", str(CONFIG), "--balancers", "static,upgrade"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and "did you mean 'upgrad'" in result.stderr and "Traceback" not in result.stderr
