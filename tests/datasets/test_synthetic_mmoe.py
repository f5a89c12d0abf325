"""SyntheticMMoE: the task pair of Ma et al. (2018), seeded tasks and samples, and bad input."""

import math

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_mtl import MultiTaskDataModule
from lightning_mtl.datasets import SyntheticMMoE


@pytest.mark.parametrize("correlation", [1.0, 0.9, 0.5, 0.0, -0.3])
def test_weight_vectors_have_the_requested_cosine_similarity_and_scale(correlation):
    data = SyntheticMMoE(10, correlation, dim=100, scale=2.0)
    w1, w2 = data.weights.double()
    assert w1.norm().item() == pytest.approx(2.0, rel=1e-6) and w2.norm().item() == pytest.approx(2.0, rel=1e-6)
    cosine = (w1 @ w2 / (w1.norm() * w2.norm())).item()
    assert cosine == pytest.approx(correlation, abs=1e-6)


def test_labels_follow_the_papers_formula():
    data = SyntheticMMoE(500, 0.5, dim=20, seed=3, sample_seed=1, noise_std=0.0, num_sinusoids=10)
    assert data.alphas.shape == data.betas.shape == (10,)
    for task, w in zip(SyntheticMMoE.TASKS, data.weights):
        z = data.x @ w
        expected = z + torch.sin(z[:, None] * data.alphas + data.betas).sum(dim=1)
        torch.testing.assert_close(data.targets[task], expected, rtol=1e-4, atol=1e-4)
    noisy = SyntheticMMoE(20_000, 0.5, dim=20, seed=3, sample_seed=1, noise_std=0.1)
    clean = SyntheticMMoE(20_000, 0.5, dim=20, seed=3, sample_seed=1, noise_std=0.0)
    residual = noisy.targets["t1"] - clean.targets["t1"]
    assert residual.std().item() == pytest.approx(0.1, rel=0.05)  # ε ~ N(0, 0.01): variance 0.01


def test_seed_fixes_the_tasks_and_sample_seed_the_samples():
    train = SyntheticMMoE(50, 0.9, seed=7, sample_seed=0)
    test = SyntheticMMoE(50, 0.9, seed=7, sample_seed=1)
    again = SyntheticMMoE(50, 0.9, seed=7, sample_seed=0)
    other_tasks = SyntheticMMoE(50, 0.9, seed=8, sample_seed=0)
    assert torch.equal(train.weights, test.weights) and torch.equal(train.alphas, test.alphas)
    assert not torch.equal(train.x, test.x)
    assert torch.equal(train.x, again.x) and torch.equal(train.targets["t2"], again.targets["t2"])
    assert not torch.equal(train.weights, other_tasks.weights)
    default = SyntheticMMoE(50, 0.9, seed=7)
    assert torch.equal(default.weights, train.weights) and not torch.equal(default.x, train.x)
    # the same task pair (u1, u2, alphas, betas) underlies every correlation of one seed
    assert torch.equal(SyntheticMMoE(5, 0.5, seed=7).weights[0], train.weights[0])


def test_given_sinusoids_are_used_for_every_task_pair():
    alphas, betas = SyntheticMMoE.GOOGLE_RESEARCH_SINUSOIDS
    assert alphas == tuple(float(j) for j in range(1, 11)) and betas == tuple(float((j - 1) ** 2) for j in range(1, 11))
    first = SyntheticMMoE(200, 0.5, dim=20, seed=1, alphas=alphas, betas=betas, noise_std=0.0)
    second = SyntheticMMoE(200, 0.5, dim=20, seed=2, alphas=alphas, betas=betas, noise_std=0.0)
    for data in (first, second):
        assert data.alphas.tolist() == list(alphas) and data.betas.tolist() == list(betas)
        z = data.x @ data.weights[0]
        expected = z + torch.sin(z[:, None] * data.alphas + data.betas).sum(dim=1)
        torch.testing.assert_close(data.targets["t1"], expected, rtol=1e-4, atol=1e-4)
    assert not torch.equal(first.weights, second.weights)
    # fixing the sinusoids leaves the task pair's weight vectors and the samples as they were
    drawn = SyntheticMMoE(200, 0.5, dim=20, seed=1, noise_std=0.0)
    assert torch.equal(drawn.weights, first.weights) and torch.equal(drawn.x, first.x)
    assert not torch.equal(drawn.alphas, first.alphas)


def test_drawn_sinusoids_scale_with_sinusoid_std():
    wide = torch.cat([SyntheticMMoE(1, 0.5, seed=s).alphas for s in range(50)])
    narrow = torch.cat([SyntheticMMoE(1, 0.5, seed=s, sinusoid_std=0.1).alphas for s in range(50)])
    assert 0.8 < wide.std().item() < 1.2  # N(0, 1) by default
    torch.testing.assert_close(narrow, wide * 0.1)


def test_label_correlation_decreases_with_the_task_correlation():
    correlations = [SyntheticMMoE(10_000, p, seed=2).label_correlation() for p in (1.0, 0.9, 0.5, 0.0)]
    assert correlations[0] > 0.98  # identical tasks up to the noise (how much depends on the seed's sinusoids)
    assert correlations[0] > correlations[1] > correlations[2] > correlations[3]
    assert abs(correlations[3]) < 0.05


def test_items_batch_into_shared_input_form():
    data = SyntheticMMoE(10, 0.5, dim=8)
    x, labels = data[3]
    assert x.shape == (8,) and x.dtype == torch.float32
    assert set(labels) == {"t1", "t2"} and labels["t1"].shape == () and labels["t1"].dtype == torch.float32
    batch = next(iter(MultiTaskDataModule(data, batch_size=4).train_dataloader()))
    assert batch[0].shape == (4, 8) and batch[1]["t2"].shape == (4,)
    assert len(DataLoader(data, batch_size=4)) == 3
    assert "correlation=0.5" in repr(data)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0}, "`n` must be an int >= 1"),
        ({"correlation": 1.5}, r"`correlation` must be in \[-1, 1\]"),
        ({"correlation": -2.0}, "`correlation` must be >= -1"),
        ({"correlation": math.nan}, "`correlation` must be a finite number"),
        ({"dim": 1}, "`dim` must be an int >= 2"),
        ({"seed": -1}, "`seed` must be an int >= 0"),
        ({"sample_seed": 1.5}, "`sample_seed` must be an int >= 0"),
        ({"noise_std": -0.1}, "`noise_std` must be >= 0"),
        ({"num_sinusoids": -1}, "`num_sinusoids` must be an int >= 0"),
        ({"alphas": [1.0] * 10}, "`alphas` and `betas` must be given together"),
        ({"alphas": [1.0] * 10, "betas": [0.0] * 9}, "`betas` must have `num_sinusoids` = 10 values, got 9"),
        ({"alphas": [1.0, math.inf], "betas": [0.0, 0.0], "num_sinusoids": 2}, "`alphas` must be a finite number"),
        ({"alphas": "ab", "betas": "cd", "num_sinusoids": 2}, "`alphas` must be a sequence of finite numbers"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticMMoE(**{"n": 10, "correlation": 0.5, **kwargs})
