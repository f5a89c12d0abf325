"""Defects a review of the command line found (issue #12), each reproduced here first."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_mtl.cli import ConfigError, run
from test_cli import CONFIG, short

PER_TASK = CONFIG.with_name("multidigits_per_task.yaml")


def csv_logger(version: str, root: Path) -> list[str]:
    return ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(root / "logs"),
            "--trainer.logger.name", "exp", "--trainer.logger.version", version]  # fmt: skip


def columns(path: Path) -> list[str]:
    with path.open() as file:
        return next(csv.reader(file))


def test_a_refused_run_leaves_the_earlier_runs_csv_metrics_alone(tmp_path: Path) -> None:
    first = run(["fit", *short(tmp_path, *csv_logger("v1", tmp_path))])
    folder = tmp_path / "logs" / "exp" / "v1"
    metrics = (folder / "metrics.csv").read_bytes()
    with pytest.raises(FileExistsError, match="config.yaml already exists"):
        run(["fit", *short(tmp_path, *csv_logger("v1", tmp_path))])
    assert (folder / "metrics.csv").read_bytes() == metrics  # CSVLogger deleted it before the refusal
    # continuing that run in its folder keeps the fit's metrics beside the new command's
    checkpoint = first.trainer.checkpoint_callback.best_model_path
    run(["test", *short(tmp_path, *csv_logger("v1", tmp_path)), "--ckpt_path", checkpoint])
    assert (folder / "metrics-1.csv").read_bytes() == metrics
    assert any(name.startswith("val/") for name in columns(folder / "metrics-1.csv"))
    assert any(name.startswith("test/") for name in columns(folder / "metrics.csv"))


def test_a_refused_second_predict_writes_no_config(tmp_path: Path) -> None:
    fit = run(["fit", *short(tmp_path, "--trainer.logger", "false")])
    checkpoint = fit.trainer.checkpoint_callback.best_model_path
    predict = ["predict", *short(tmp_path, "--trainer.logger", "false"), "--ckpt_path", checkpoint]
    run(predict)
    assert (tmp_path / "config-predict-1.yaml").exists()
    with pytest.raises(FileExistsError, match="already holds files"):
        run(predict)
    assert not (tmp_path / "config-predict-2.yaml").exists()


def test_predict_without_a_predict_split_names_the_option_to_set(tmp_path: Path) -> None:
    config = yaml.safe_load(PER_TASK.read_text())
    del config["data"]["init_args"]["predict"]
    for split in ("train", "val", "test"):
        for dataset in config["data"]["init_args"][split].values():
            dataset["init_args"]["size"] = 16
    path = tmp_path / "no_predict.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"no predict split.*data.init_args.predict"):
        run(["predict", "--config", str(path), "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"])
    assert not (tmp_path / "config.yaml").exists()


def lightning_mtl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_mtl.cli", *args], capture_output=True, text=True,
                          timeout=180, cwd=cwd)  # fmt: skip


def test_print_config_runs_the_parse_time_checks_too(tmp_path: Path) -> None:
    result = lightning_mtl("fit", "--config", str(CONFIG), "--model.balancer", "upgrade", "--print_config", cwd=tmp_path)
    assert result.returncode == 2 and "did you mean 'upgrad'" in result.stderr and "balancer:" not in result.stdout


@pytest.mark.parametrize("base", ["Balancer", "GramianBalancer"])
def test_an_abstract_balancer_base_is_refused_while_parsing(base: str) -> None:
    with pytest.raises(ConfigError, match=f"{base} is an abstract base.*UPGrad"):
        run(["fit", "--config", str(CONFIG), "--model.balancer", f"{{class_path: lightning_mtl.balancers.{base}}}"])
