"""Per-task data from YAML: ``examples/configs/multidigits_per_task.yaml`` with every sampling mode, end to end.

The bundled config builds a ``MultiTaskDataModule`` with one ``MultiDigitsTask`` dataset per task (``class_path``
per task). The CLI run is shrunk (sizes, backbone) and checked to resume mid-epoch to the same weights as a
straight run, for every sampling mode.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_mtl.cli import run
from lightning_mtl.data import SAMPLING_MODES, MultiTaskDataModule
from lightning_mtl.datasets import MultiDigitsTask

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "multidigits_per_task.yaml"
SIZES = {"train": {"left": 48, "right": 40, "sum": 24}, "val": 16, "test": 16}


def small_config(path: Path, sampling: str) -> Path:
    config = yaml.safe_load(CONFIG.read_text())
    data = config["data"]["init_args"]
    for split in ("train", "val", "test"):
        for task, dataset in data[split].items():
            size = SIZES[split][task] if split == "train" else SIZES[split]
            dataset["init_args"]["size"] = size
    data.update(batch_size=8, sampling=sampling)
    backbone = config["model"]["backbone"]["init_args"]
    backbone["channels"] = [4, 8]
    config.update(test_after_fit=False)
    config["trainer"].update(
        default_root_dir=str(path / "runs"), enable_progress_bar=False, enable_model_summary=False, logger=False,
        callbacks=[],
    )
    out = path / f"{sampling}.yaml"
    out.write_text(yaml.safe_dump(config))
    return out


def test_the_bundled_config_builds_per_task_datasets_for_every_sampling_mode(tmp_path: Path) -> None:
    for sampling in SAMPLING_MODES:
        root = ["--trainer.default_root_dir", str(tmp_path / sampling)]  # each run its own folder
        cli = run(["fit", "--config", str(small_config(tmp_path, sampling)), "--trainer.max_epochs", "0", *root])
        data = cli.datamodule
        assert isinstance(data, MultiTaskDataModule) and data.sampling == sampling
        assert data.task_names == ["left", "right", "sum"]
        train = data.splits["train"]
        assert all(isinstance(train[task], MultiDigitsTask) and train[task].task == task for task in train)
        assert [len(train[task]) for task in train] == [48, 40, 24]
        batches = list(data.train_dataloader())
        tasks_per_step = {len(batch) for batch in batches}
        assert tasks_per_step == ({3} if sampling.startswith("zip") else {1})
        x, y = next(iter(batches[0].values()))
        assert x.shape[1:] == (1, 12, 20) and y.ndim == 1


def test_an_unknown_sampling_mode_is_refused_while_parsing_with_the_valid_ones(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        run(["fit", "--config", str(small_config(tmp_path, "zip")), "--data.init_args.sampling", "temprature"])
    error = capsys.readouterr().err
    assert "temprature" in error and all(mode in error for mode in SAMPLING_MODES)


def weights(cli) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in cli.model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("sampling", SAMPLING_MODES)
def test_a_per_task_cli_run_resumed_mid_epoch_equals_a_straight_run(tmp_path: Path, sampling: str) -> None:
    config = ["--config", str(small_config(tmp_path, sampling))]

    def root(name: str) -> list[str]:
        return ["--trainer.default_root_dir", str(tmp_path / name)]  # each run its own folder

    straight = weights(run(["fit", *config, *root("straight"), "--trainer.max_epochs", "2"]))
    checkpoint = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=5",
                  "--trainer.callbacks.filename=mid", "--trainer.callbacks.dirpath", str(tmp_path / "ckpt")]
    run(["fit", *config, *root("first"), "--trainer.max_epochs", "2", "--trainer.max_steps", "5", *checkpoint])
    state = torch.load(tmp_path / "ckpt" / "mid.ckpt", weights_only=True)["loops"]["fit_loop"]["state_dict"]
    (loader_state,) = state["combined_loader"]
    assert loader_state["step"] > 0  # mid-epoch: every mode here has more than 5 steps per epoch
    resumed = weights(run(["fit", *config, *root("resumed"), "--trainer.max_epochs", "2", "--ckpt_path", str(tmp_path / "ckpt" / "mid.ckpt")]))
    assert resumed.keys() == straight.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(resumed[name], value) for name, value in weights(run(["fit", *config, *root("one_epoch"), "--trainer.max_epochs", "1"])).items())
