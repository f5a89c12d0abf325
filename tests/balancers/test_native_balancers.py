"""Hand-derived checks of the methods implemented here (GradNorm, DBMTL)."""

import math

import pytest
import torch

from lightning_mtl.balancers import DBMTL, GradNorm


def _adam(grads, lr, betas=(0.9, 0.999), eps=1e-8):
    """Adam's update after each of ``grads`` (Kingma & Ba, 2015, Algorithm 1), written out."""
    m = v = 0.0
    updates = []
    for t, g in enumerate(grads, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        updates.append(-lr * m_hat / (math.sqrt(v_hat) + eps))
    return updates


def test_gradnorm_two_updates_by_hand():
    balancer = GradNorm(alpha=1.5, lr=0.025)
    # Step 1: ‖∇L‖ = (3, 1), L = L(0) = (2, 1): r = (1, 1), G = w‖∇L‖ = (3, 1), Ḡ = 2, target (2, 2),
    # ∂L_grad/∂w = sign(G − target) ‖∇L‖ = (3, −1).
    weights = balancer.weights(torch.diag(torch.tensor([9.0, 1.0])), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(weights, torch.tensor([1.0, 1.0]))  # the step uses w(t), before the update
    step_a, step_b = _adam([3.0], 0.025)[0], _adam([-1.0], 0.025)[0]
    w = torch.tensor([1 + step_a, 1 + step_b])
    w = w * 2 / w.sum()
    torch.testing.assert_close(balancer.task_weights_, w)
    # Step 2: ‖∇L‖ = (1, 3), L = (1, 0.8): L̃ = (0.5, 0.8), r = L̃ / 0.65, G = (w₁, 3 w₂), Ḡ = mean(G).
    weights = balancer.weights(torch.diag(torch.tensor([1.0, 9.0])), torch.tensor([1.0, 0.8]))
    torch.testing.assert_close(weights, w)
    r = torch.tensor([0.5, 0.8]) / 0.65
    G = w * torch.tensor([1.0, 3.0])
    target = G.mean() * r**1.5
    grad = torch.sign(G - target) * torch.tensor([1.0, 3.0])
    assert grad.tolist() == [-1.0, 3.0]
    updates = [_adam([3.0, grad[0].item()], 0.025)[1], _adam([-1.0, grad[1].item()], 0.025)[1]]
    expected = w + torch.tensor(updates)
    torch.testing.assert_close(balancer.task_weights_, expected * 2 / expected.sum())


def test_gradnorm_needs_losses_and_skips_absent_tasks():
    balancer = GradNorm()
    with pytest.raises(ValueError, match="losses"):
        balancer.weights(torch.eye(2))
    gramian = torch.diag(torch.tensor([4.0, 0.0, 1.0]))
    weights = balancer.weights(gramian, torch.tensor([1.0, 0.0, 2.0]))
    assert weights.tolist() == [1.0, 0.0, 1.0]
    assert torch.isnan(balancer.initial_losses[1]) and balancer.initial_losses[2] == 2.0
    assert balancer.task_weights_.sum().item() == pytest.approx(3.0)


def test_dbmtl_first_steps_by_hand():
    balancer = DBMTL(beta=0.9)
    g1, g2 = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0])
    d = balancer(torch.stack([g1, g2]))
    # EMA = (1 − β) g = (0.3, 0.4) [norm 0.5] and (0, 0.1) [norm 0.1]; scales 0.5/0.5 and 0.5/0.1.
    torch.testing.assert_close(balancer.ema, 0.1 * torch.stack([g1, g2]))
    torch.testing.assert_close(d, torch.tensor([0.3, 0.4]) + 5 * torch.tensor([0.0, 0.1]))
    # Step 2, task 2 absent: its EMA stays, and it is left out.
    d = balancer(torch.stack([torch.tensor([1.0, 0.0]), torch.zeros(2)]))
    ema1 = 0.9 * 0.1 * g1 + 0.1 * torch.tensor([1.0, 0.0])
    torch.testing.assert_close(balancer.ema, torch.stack([ema1, 0.1 * g2]))
    torch.testing.assert_close(d, ema1)
    # Step 3: both present again.
    g = torch.stack([torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0])])
    d = balancer(g)
    ema = torch.stack([0.9 * ema1 + 0.1 * g[0], 0.9 * 0.1 * g2 + 0.1 * g[1]])
    norms = ema.norm(dim=1)
    torch.testing.assert_close(d, (norms.max() / norms) @ ema)


def test_dbmtl_asks_for_log_loss_gradients():
    assert DBMTL.log_losses is True and DBMTL.needs == "gradients"


def test_gradnorm_averages_a_task_loss_over_the_processes_that_have_it():
    """Rank 0 has no sample of task b (loss 0, absent); rank 1 has it with loss 2: the mean is 2, not 1."""
    balancer = GradNorm()
    balancer.setup(["a", "b"])
    other_rank = torch.stack([torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])])  # (loss * mask, mask)
    balancer.all_reduce_mean = lambda tensor: (tensor + other_rank) / 2
    gramian = torch.eye(2)  # global: both tasks have a gradient
    balancer.weights(gramian, torch.tensor([3.0, 0.0]), present=torch.tensor([True, False]))
    torch.testing.assert_close(balancer.initial_losses, torch.tensor([2.0, 2.0]))


def test_gradnorm_weights_with_and_without_nonzero_are_identical():
    """The module passes ``nonzero`` (the diagonal it read on the host) and ``entries`` (all of it); GradNorm
    gives the same numbers, bit for bit, over steps with an absent task and across a state load."""
    generator = torch.Generator().manual_seed(0)
    without, with_nonzero = GradNorm(alpha=1.5, lr=0.1), GradNorm(alpha=1.5, lr=0.1)
    for balancer in (without, with_nonzero):
        balancer.setup(["a", "b", "c"])
    for step in range(12):
        G = torch.randn(3, 7, generator=generator)
        losses = torch.rand(3, generator=generator) + 0.1
        if step in (0, 5):  # task b absent: no gradient
            G[1] = 0
            losses[1] = 0
        if step == 8:  # a resumed run: the state comes from a checkpoint
            with_nonzero.load_state_dict(with_nonzero.state_dict())
        expected = without.weights(G @ G.T, losses)
        nonzero = [bool(row.any()) for row in G]
        if step % 2:  # the module also passes the entries it has read
            got = with_nonzero.weights(G @ G.T, losses, nonzero=nonzero, entries=(G @ G.T).reshape(-1).tolist())
        else:
            got = with_nonzero.weights(G @ G.T, losses, nonzero=nonzero)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"step {step}")
        torch.testing.assert_close(with_nonzero.task_weights_, without.task_weights_, rtol=0, atol=0)


def test_gradnorm_keeps_a_zero_initial_loss_at_ratio_one():
    balancer = GradNorm()
    balancer.setup(["a", "b"])
    G = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    for _ in range(3):
        balancer.weights(G @ G.T, torch.tensor([1.0, 0.0]), nonzero=[True, True])
    assert balancer.initial_losses[1] == 0  # b's ratio L/L(0) is taken as 1, not NaN
    assert torch.isfinite(balancer.task_weights_).all()


def test_gradnorm_rejects_nonzero_of_the_wrong_length():
    balancer = GradNorm()
    balancer.setup(["a", "b"])
    with pytest.raises(ValueError, match="nonzero has 3 entries for a 2 x 2 gramian"):
        balancer.weights(torch.eye(2), torch.ones(2), nonzero=[True, True, True])


def test_gradnorm_absent_task_keeps_its_weight_and_the_present_ones_take_the_rest():
    """Task c is absent at step 2: its w_c stays exactly (no Adam momentum, no rescaling); a and b take
    their Adam step and are renormalised so that Σ w = K with w_c held fixed."""
    balancer = GradNorm(alpha=1.5, lr=0.025)
    balancer.setup(["a", "b", "c"])
    # Step 1: ‖∇L‖ = (2, 1, 1), L = L(0): r = 1, G = (2, 1, 1), Ḡ = 4/3, ∂L_grad/∂w = (2, −1, −1).
    balancer.weights(torch.diag(torch.tensor([4.0, 1.0, 1.0])), torch.ones(3))
    first = torch.tensor([_adam([2.0], 0.025)[0], _adam([-1.0], 0.025)[0], _adam([-1.0], 0.025)[0]])
    w1 = (1 + first) * 3 / (1 + first).sum()
    torch.testing.assert_close(balancer.task_weights_, w1)
    kept = balancer.task_weights_[2].clone()
    # Step 2, c absent: ‖∇L‖ = (2, 1, 0), r = 1, G = (2 w₁, w₂) with 2 w₁ > Ḡ > w₂: ∂L_grad/∂w = (2, −1, 0).
    weights = balancer.weights(torch.diag(torch.tensor([4.0, 1.0, 0.0])), torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(weights, w1 * torch.tensor([1.0, 1.0, 0.0]))  # this step's weights: w(t), c at 0
    assert torch.equal(balancer.task_weights_[2], kept)
    stepped = w1[:2] + torch.tensor([_adam([2.0, 2.0], 0.025)[1], _adam([-1.0, -1.0], 0.025)[1]])
    torch.testing.assert_close(balancer.task_weights_[:2], stepped * (3 - w1[2]) / stepped.sum())
    assert balancer.task_weights_.sum().item() == pytest.approx(3.0)


def test_gradnorm_weights_stay_positive_against_a_dominant_gradient():
    """A task whose gradient is 100 times the others' is pushed down step after step; its weight is
    floored before the renormalisation, so it never reaches 0 or below (it did at step 35)."""
    balancer = GradNorm()
    balancer.setup(["a", "b", "c"])
    gramian = torch.diag(torch.tensor([100.0**2, 1.0, 1.0]))
    lowest = float("inf")
    for step in range(200):
        weights = balancer.weights(gramian, torch.ones(3))
        assert (weights > 0).all(), f"step {step}: {weights.tolist()}"
        lowest = min(lowest, weights[0].item())
    assert balancer.task_weights_.sum().item() == pytest.approx(3.0)
    assert lowest < 2 * GradNorm.min_weight  # the floor, not the dynamics, is what kept it positive
