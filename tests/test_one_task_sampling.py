"""A balancer that compares the tasks of a step is refused at fit start under one-task-per-step sampling (issue 12).

Before, FAMO, UPGrad, ... under ``round_robin``/``proportional``/``temperature``/``sequential`` sampling weighed
one task per step, logged weights of 1 and trained like the plain loss, without a word.
"""

import lightning as L
import pytest
import torch
from torch.utils.data import TensorDataset

from conftest import quiet_trainer
from lightning_mtl import MultiTaskDataModule
from test_module import make_module


def task_data():
    generator = torch.Generator().manual_seed(0)
    xc, xr = torch.randn(24, 6, generator=generator), torch.randn(16, 6, generator=generator)
    return {"cls": TensorDataset(xc, (xc[:, 0] > 0).long()), "reg": TensorDataset(xr, xr[:, 1])}


class CountSteps(L.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps += 1


def fit(balancer, sampling, gradients="parameters", counter=None):
    module, counter = make_module(balancer=balancer, gradients=gradients), counter or CountSteps()
    data = MultiTaskDataModule(task_data(), batch_size=8, sampling=sampling)
    quiet_trainer(max_epochs=1, callbacks=[counter]).fit(module, datamodule=data)
    return module, counter.steps


@pytest.mark.parametrize(
    "balancer, gradients, name",
    [
        ("famo", "parameters", "FAMO"),
        ("upgrad", "parameters", "UPGrad"),
        ("upgrad", "representation", "UPGrad"),
        ("gls", "parameters", "GLS"),
        ("gradnorm", "representation", "GradNorm"),
    ],
)
def test_a_balancer_with_one_task_per_step_is_refused_at_fit_start_with_the_fix(balancer, gradients, name):
    counter = CountSteps()
    with pytest.raises(ValueError) as raised:
        fit(balancer, "temperature", gradients, counter)
    message = str(raised.value)
    assert f"balancer {name} does nothing under sampling='temperature': each step holds one task" in message
    assert "plain per-task training" in message
    assert "sampling='zip' or 'zip_shortest'" in message and "batch_size={task: n}" in message
    assert "balancer=None" in message
    assert counter.steps == 0  # refused before any step


@pytest.mark.parametrize("sampling", ["round_robin", "proportional", "sequential"])
def test_every_one_task_mode_is_checked(sampling):
    counter = CountSteps()
    with pytest.raises(ValueError, match=f"balancer FAMO does nothing under sampling='{sampling}'"):
        fit("famo", sampling, counter=counter)
    assert counter.steps == 0


@pytest.mark.parametrize("balancer", [None, "static", "uw", "imtll", "dwa"])
def test_a_balancer_that_weighs_each_task_on_its_own_trains_one_task_per_step(balancer):
    module, steps = fit(balancer, "temperature")
    assert steps == 5  # (24 + 16) / 8
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("sampling", ["zip", "zip_shortest"])
def test_every_task_in_every_step_trains_with_famo(sampling):
    module, steps = fit("famo", sampling)
    assert steps == (3 if sampling == "zip" else 2)
    assert module.last_step is not None and module.last_step.present.all()


def test_a_single_task_data_module_is_not_refused():
    """Every step then holds every task the data has: ``zip`` would change nothing, so there is nothing to fix."""
    module = make_module(balancer="famo")
    data = MultiTaskDataModule({"cls": task_data()["cls"]}, batch_size=8, sampling="round_robin")
    with pytest.warns(UserWarning, match="never trained"):
        quiet_trainer(max_epochs=1).fit(module, datamodule=data)
    assert module.last_step is not None
