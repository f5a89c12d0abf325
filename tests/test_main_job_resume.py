"""The main job (``examples/configs/multidigits.yaml`` through ``lightning-mtl fit``) resumes exactly.

``fit --ckpt_path`` from the end of an epoch or from the middle of one ends with the same weights as one straight
run: the training order of ``MultiDigitsDataModule`` is a pure function of ``(seed, epoch)`` and its position is in
the checkpoint (it used to restart each resumed run at the first epoch's order).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_mtl.cli import run

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "multidigits.yaml"
SMALL = [
    "--config", str(CONFIG),
    "--data.init_args.train_size", "192",
    "--data.init_args.val_size", "32",
    "--data.init_args.test_size", "32",
    "--data.init_args.batch_size", "32",
    "--model.backbone.init_args.channels", "[4, 8]",
    "--model.backbone.init_args.out_features", "128",
    "--test_after_fit", "false",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.logger", "false",
]


def fit(root: Path, *extra: str):
    return run(["fit", *SMALL, "--trainer.default_root_dir", str(root), *extra])


def weights(cli) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in cli.model.state_dict().items()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return weights(fit(tmp_path_factory.mktemp("straight"), "--trainer.max_epochs", "2"))


def assert_same(resumed: dict[str, torch.Tensor], straight: dict[str, torch.Tensor]) -> None:
    assert resumed.keys() == straight.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


def test_resume_at_an_epoch_end_equals_a_straight_run(tmp_path: Path, straight) -> None:
    checkpoint = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last=true",
                  "--trainer.callbacks.dirpath", str(tmp_path / "ckpt")]
    fit(tmp_path / "first", "--trainer.max_epochs", "1", *checkpoint)
    resumed = fit(tmp_path / "second", "--trainer.max_epochs", "2", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"))
    assert_same(weights(resumed), straight)


def test_resume_mid_epoch_equals_a_straight_run(tmp_path: Path, straight) -> None:
    # 6 steps per epoch: stop after 8 steps, in the middle of the second epoch
    checkpoint = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=8",
                  "--trainer.callbacks.filename=mid", "--trainer.callbacks.dirpath", str(tmp_path / "ckpt")]
    fit(tmp_path / "first", "--trainer.max_epochs", "2", "--trainer.max_steps", "8", *checkpoint)
    state = torch.load(tmp_path / "ckpt" / "mid.ckpt", weights_only=True)["loops"]["fit_loop"]["state_dict"]
    (loader_state,) = state["combined_loader"]
    assert (loader_state["epoch"], loader_state["step"]) == (1, 2)
    resumed = fit(tmp_path / "second", "--trainer.max_epochs", "2", "--ckpt_path", str(tmp_path / "ckpt" / "mid.ckpt"))
    assert_same(weights(resumed), straight)
