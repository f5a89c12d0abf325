"""Under ``WandbLogger`` (offline) each run's ``config.yaml`` lies in its own folder, beside its ``checkpoints/``."""

import json
from pathlib import Path

import pytest

from lightning_mtl.cli import run
from test_cli import short

wandb = pytest.importorskip("wandb")


def wandb_logger(**init_args) -> tuple[str, str]:
    spec = {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"offline": True, **init_args}}
    return "--trainer.logger", json.dumps(spec)


def fit(root: Path, *args: str):
    try:
        cli = run(["fit", *short(root, *args)])
    finally:
        wandb.finish()  # one W&B run per process, as from the command line
    return Path(cli.trainer.checkpoint_callback.best_model_path).resolve().parents[1]


@pytest.mark.parametrize("save_dir", ["given", "default"])
def test_each_run_saves_its_config_beside_its_own_checkpoints(offline, save_dir):
    init_args = {"project": "mtl", **({"save_dir": str(offline / "logs")} if save_dir == "given" else {})}
    first = fit(offline / "root", *wandb_logger(**init_args))
    first_config = (first / "config.yaml").read_bytes()
    second = fit(offline / "root", *wandb_logger(**init_args), "--model.optimizer.init_args.lr", "0.01")
    parent = offline / "logs" if save_dir == "given" else offline / "cwd"  # WandbLogger's save_dir: "." by default
    for folder in (first, second):
        assert folder.parent == parent / "mtl" and (folder / "checkpoints").is_dir()
        assert (folder / "config.yaml").is_file()
    assert first != second  # W&B's run id is the version: a folder per run
    assert (first / "config.yaml").read_bytes() == first_config and b"lr: 0.01" not in first_config
    assert "lr: 0.01" in (second / "config.yaml").read_text()
    assert not (offline / "cwd" / "config.yaml").exists() and not (offline / "root" / "config.yaml").exists()


def test_a_run_reusing_a_wandb_id_stops_before_writing_over_the_first_runs_config(offline):
    logger = wandb_logger(project="mtl", save_dir=str(offline / "logs"), id="fixed")
    first = fit(offline / "root", *logger)
    saved = (first / "config.yaml").read_bytes()
    with pytest.raises(FileExistsError, match=r"mtl/fixed/config.yaml already exists"):
        fit(offline / "root", *logger, "--model.optimizer.init_args.lr", "0.01")
    assert (first / "config.yaml").read_bytes() == saved
