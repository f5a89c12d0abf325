"""``supports_one_task_per_step`` says what a method does when every step holds one task (issue 12).

One-task-per-step sampling (``round_robin``, ``proportional``, ``temperature``, ``sequential``) is a
step split into one step per task. A method supports it when the split gives every task the update
the whole step gives it: the weight of a task does not depend on the other tasks of the step.
"""

import pytest
import torch

from lightning_mtl.balancers import BALANCERS, DBMTL

from balancer_helpers import HAS_SOLVERS

K, P = 3, 12
METHODS = [cls for cls in BALANCERS.values() if HAS_SOLVERS or cls.__name__ not in ("CAGrad", "NashMTL")]


def _inputs(step):
    generator = torch.Generator().manual_seed(step)
    G = torch.randn(K, P, generator=generator) * (torch.rand(K, 1, generator=generator) * 3 + 0.2)
    return G, torch.rand(K, generator=generator) * 2 + 0.3


def _update(balancer, G, losses, present):
    """The shared-parameter update of one step (``Σ_k w_k g_k``, or the direction), state updates included
    as the module makes them: the balancer's learned parameters take an SGD step, FAMO gets the losses
    after the step."""
    G = G * present[:, None]
    losses = (losses * present).requires_grad_(True)
    if balancer.needs == "losses":
        loss, weights = balancer(losses, present)
        parameters = [p for p in balancer.parameters() if p.requires_grad]
        if parameters:
            with torch.no_grad():
                for parameter, grad in zip(parameters, torch.autograd.grad(loss, parameters)):
                    parameter -= 0.3 * grad
        if balancer.needs_losses_after_step:
            balancer.after_optimizer_step(losses.detach() * torch.linspace(0.6, 0.95, K))
        return weights @ G
    if balancer.needs == "gramian":
        return balancer.weights(G @ G.T, losses.detach(), present) @ G
    return balancer(G)


@pytest.mark.parametrize("cls", METHODS, ids=lambda cls: cls.__name__)
def test_a_balancer_that_supports_one_task_per_step_declares_it(cls):
    """The whole step and the same step split into one call per task give the same update, epoch after epoch,
    exactly when the class declares ``supports_one_task_per_step``; for the others, the weight of the single
    task is a constant (1, STCH's 1/K, CAGrad's 1 + c), a clip (NashMTL) or a moving average (DB-MTL)."""
    whole, split = cls(), cls()
    for balancer in (whole, split):
        balancer.setup(["a", "b", "c"], [1.0, 2.0, 0.5])
    every = torch.ones(K, dtype=torch.bool)
    same = True
    for step in range(9):
        G, losses = _inputs(step)
        joint = _update(whole, G, losses, every)
        parts = sum(_update(split, G, losses, torch.arange(K) == k) for k in range(K))
        same = same and torch.allclose(joint, parts, rtol=1e-5, atol=1e-6)
        if step % 2 == 1:  # DWA's weights move from the third epoch on
            whole.on_train_epoch_end()
            split.on_train_epoch_end()
    assert same == cls.supports_one_task_per_step


# With one task, NashMTL is the task's gradient clipped to max_norm (test_nashmtl_single_task_is_the_clipped_gradient)
# and DB-MTL the task's own moving average of its log-loss gradient (below): no multiple of the step's gradient;
# FairGrad's weight is ‖g‖^(-2α/(1+α)) and MoCo's direction the task's tracked gradient (test_new_methods.py).
NOT_CONSTANT = ("NashMTL", "DBMTL", "FairGrad", "MoCo")
CONSTANT = [cls for cls in METHODS if not cls.supports_one_task_per_step and cls.__name__ not in NOT_CONSTANT]


@pytest.mark.parametrize("cls", CONSTANT, ids=lambda cls: cls.__name__)
def test_with_one_task_per_step_a_refused_method_is_a_constant_weight(cls):
    """The same multiple of the task's gradient for every task and step (1; STCH 1/K; CAGrad 1 + c): plain training."""
    balancer = cls()
    balancer.setup(["a", "b", "c"], [1.0, 2.0, 0.5])
    factors = []
    for step in range(9):
        G, losses = _inputs(step)
        g = G[step % K]
        update = _update(balancer, G, losses, torch.arange(K) == step % K)
        factor = update @ g / (g @ g)
        torch.testing.assert_close(update, factor * g, rtol=1e-5, atol=1e-6)
        factors.append(float(factor))
        if step % 2 == 1:
            balancer.on_train_epoch_end()
    assert factors == pytest.approx([factors[0]] * len(factors), rel=1e-5)


def test_with_one_task_per_step_dbmtl_is_the_task_moving_average():
    balancer = DBMTL()
    balancer.setup(["a", "b", "c"])
    for step in range(6):
        G, losses = _inputs(step)
        update = _update(balancer, G, losses, torch.arange(K) == step % K)
        torch.testing.assert_close(update, balancer.ema[step % K])
