"""End-to-end: MultiTaskModule + MultiTaskDataModule on MultiDigits under mixed precision and resume."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from conftest import quiet_trainer
from lightning_mtl import MultiTaskDataModule, MultiTaskModule, Task
from lightning_mtl.architectures import MLP, RegressionHead
from lightning_mtl.datasets import multidigits_per_task

pytestmark = pytest.mark.slow


def model():
    torch.manual_seed(0)
    tasks = [
        Task(name, nn.Linear(64, 10), nn.CrossEntropyLoss(), {"acc": MulticlassAccuracy(10, average="micro")})
        for name in ("left", "right")
    ] + [Task("sum", RegressionHead(64), nn.MSELoss(), weight=0.5)]
    return MultiTaskModule(MLP(240, [128, 64]), tasks, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))


def data(sampling="temperature"):
    sizes = {"left": 1500, "right": 900, "sum": 600}
    return MultiTaskDataModule(
        multidigits_per_task("train", size=sizes),
        val=multidigits_per_task("val", size=300),
        batch_size=32,
        sampling=sampling,
        seed=1,
    )


def fit_metrics(precision):
    module = model()
    trainer = quiet_trainer(max_epochs=8, precision=precision)
    trainer.fit(module, datamodule=data("zip"))
    assert all(torch.isfinite(p).all() for p in module.parameters())
    return {key: float(value) for key, value in trainer.callback_metrics.items()}


def test_bf16_mixed_precision_trains_like_full_precision():
    bf16, fp32 = fit_metrics("bf16-mixed"), fit_metrics("32-true")
    for task in ("left", "right"):
        assert bf16[f"val/{task}/acc"] > 0.25  # chance is 0.1
        assert bf16[f"val/{task}/acc"] == pytest.approx(fp32[f"val/{task}/acc"], abs=0.08)
    assert bf16["val/sum/loss"] == pytest.approx(fp32["val/sum/loss"], rel=0.25)


@pytest.mark.parametrize("sampling", ["temperature", "round_robin"])
def test_resume_continues_exactly(tmp_path, sampling):
    straight = model()
    quiet_trainer(max_epochs=2, num_sanity_val_steps=0).fit(straight, datamodule=data(sampling))

    first = model()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(max_epochs=1, enable_checkpointing=True, callbacks=[checkpoint], num_sanity_val_steps=0).fit(
        first, datamodule=data(sampling)
    )
    resumed = model()
    quiet_trainer(max_epochs=2, num_sanity_val_steps=0).fit(
        resumed, datamodule=data(sampling), ckpt_path=tmp_path / "last.ckpt"
    )
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
