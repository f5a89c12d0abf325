"""SoftSharing: the penalty between towers, and its place in the training loss of MultiTaskModule."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import RecordingLogger, quiet_trainer
from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.architectures import MLP, RegressionHead, SoftSharing


def perturb(model, task, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.towers[task].parameters():
            p.add_(size * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("tasks", [["a", "b"], ["a", "b", "c"]])
def test_l2_penalty_is_zero_for_identical_towers_and_grows_with_distance(tasks):
    model = SoftSharing(MLP(6, [5, 4]), tasks, penalty="l2", weight=0.5)
    assert model.penalty() == 0
    penalties = []
    for size in (0.01, 0.1, 1.0):
        perturb(model, "a", size)
        penalties.append(float(model.penalty().detach()))
    assert 0 < penalties[0] < penalties[1] < penalties[2]


def test_l2_penalty_value_is_the_sum_of_pairwise_squared_distances():
    model = SoftSharing(nn.Linear(3, 2), ["a", "b", "c"], weight=0.25)
    perturb(model, "b", 1.0)
    expected = sum(
        (pa - pb).pow(2).sum()
        for x, y in [("a", "b"), ("a", "c"), ("b", "c")]
        for pa, pb in zip(model.towers[x].parameters(), model.towers[y].parameters())
    )
    torch.testing.assert_close(model.penalty(), expected)
    torch.testing.assert_close(model.regularization_losses()["soft_sharing_penalty"], 0.25 * expected)


def test_trace_norm_penalty_is_minimal_for_identical_towers_and_grows_with_distance():
    model = SoftSharing(MLP(6, [5]), ["a", "b"], penalty="trace_norm")
    norms = [p.detach().norm() for p in model.towers["a"].parameters()]
    # identical copies: the stacked matrix has rank 1 and nuclear norm sqrt(K)·‖θ‖
    torch.testing.assert_close(model.penalty(), math.sqrt(2) * sum(norms))
    penalties = [float(model.penalty().detach())]
    for size in (0.1, 1.0):
        perturb(model, "a", size)
        penalties.append(float(model.penalty().detach()))
    assert penalties[0] < penalties[1] < penalties[2]
    model.penalty().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_penalty_gradient_pulls_towers_together():
    model = SoftSharing(nn.Linear(3, 2), ["a", "b"], weight=1.0)
    perturb(model, "a", 1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = float(model.penalty().detach())
    for _ in range(5):
        optimizer.zero_grad()
        model.regularization_losses()["soft_sharing_penalty"].backward()
        optimizer.step()
    assert float(model.penalty().detach()) < 0.01 * before


def test_penalty_is_added_to_the_training_loss_and_logged():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    data = TensorDataset(x, x[:, 0], x[:, 1])
    loader = DataLoader(data, batch_size=16, collate_fn=lambda items: (
        torch.stack([i[0] for i in items]), {"a": torch.stack([i[1] for i in items]), "b": torch.stack([i[2] for i in items])}
    ))  # fmt: skip
    backbone = SoftSharing(MLP(6, [8]), ["a", "b"], weight=1.0)
    tasks = [Task(name, RegressionHead(8), nn.MSELoss()) for name in ("a", "b")]
    module = MultiTaskModule(backbone, tasks, optimizer=lambda params: torch.optim.SGD(params, lr=0.05))
    perturb(backbone, "a", 0.5)
    logger = RecordingLogger()
    quiet_trainer(logger=logger, log_every_n_steps=1, max_epochs=2).fit(module, loader)
    assert "train/soft_sharing_penalty" in logger.keys
    penalties = [m["train/soft_sharing_penalty"] for _, m in logger.history if "train/soft_sharing_penalty" in m]
    # the penalty is part of the optimised loss: with a strong weight, training shrinks it fast
    assert len(penalties) == 8 and penalties[0] > 0
    assert penalties[-1] < 0.5 * penalties[0]
