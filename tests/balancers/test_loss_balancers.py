import copy
import math

import pytest
import torch

from lightning_mtl.balancers import DWA, FAMO, GLS, IMTLL, RLW, STCH, UW, Static

from balancer_helpers import ready

LOSS_METHODS = [Static, UW, DWA, RLW, GLS, IMTLL, FAMO, STCH]


@pytest.mark.parametrize("cls", LOSS_METHODS)
def test_absent_tasks_get_zero_weight_and_nothing_is_nan(cls):
    balancer = ready(cls)
    losses = torch.tensor([0.7, 0.0, 2.0], requires_grad=True)
    present = torch.tensor([True, False, True])
    total, weights = balancer(losses, present)
    total.backward()
    assert total.ndim == 0 and torch.isfinite(total)
    assert weights[1] == 0 and torch.isfinite(weights).all() and not weights.requires_grad
    assert torch.isfinite(losses.grad).all() and losses.grad[1] == 0
    for parameter in balancer.parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all()


@pytest.mark.parametrize("cls", LOSS_METHODS)
def test_all_tasks_absent_is_a_zero_loss(cls):
    balancer = ready(cls)
    total, weights = balancer(torch.zeros(3), torch.zeros(3, dtype=torch.bool))
    assert total == 0 and (weights == 0).all()


@pytest.mark.parametrize("cls", LOSS_METHODS)
def test_weights_are_the_gradient_of_the_loss(cls):
    balancer = ready(cls)
    losses = torch.tensor([0.5, 1.5, 3.0], requires_grad=True)
    total, weights = balancer(losses, torch.ones(3, dtype=torch.bool))
    (grad,) = torch.autograd.grad(total, losses)
    torch.testing.assert_close(grad, weights)


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, True]])
@pytest.mark.parametrize(
    "make", [UW, IMTLL, GLS, FAMO, lambda: STCH(mu=0.1, reference=[0.1, 0.2, 0.3])], ids=["UW", "IMTLL", "GLS", "FAMO", "STCH"]
)
def test_returned_weights_are_the_gradient_of_the_returned_loss(make, mask):
    """Methods that give their weights in closed form agree with autograd on their (torchjd) loss."""
    balancer = make()
    balancer.setup(["a", "b", "c"])
    with torch.no_grad():
        for parameter in balancer.parameters():
            parameter.copy_(torch.tensor([0.3, -0.4, 0.8]))
    present = torch.tensor(mask)
    losses = (torch.tensor([0.5, 1.5, 3.0]) * present).requires_grad_(True)
    total, weights = balancer(losses, present)
    (grad,) = torch.autograd.grad(total, losses)
    torch.testing.assert_close(grad, weights)


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, True]])
def test_per_task_scalarizer_without_closed_form_weights_takes_them_from_autograd(mask):
    from torchjd.scalarization import UW as TorchjdUW

    from lightning_mtl.balancers.base import MaskedScalarizer

    class AutogradUW(MaskedScalarizer):
        scalarizer_class = TorchjdUW

    generic, closed = ready(AutogradUW), ready(UW)
    with torch.no_grad():
        for balancer in (generic, closed):
            balancer.scalarizer.log_var.copy_(torch.tensor([0.3, -0.4, 0.8]))
    present = torch.tensor(mask)
    losses = torch.tensor([0.5, 1.5, 3.0]) * present
    (total, weights), (expected, expected_weights) = generic(losses, present), closed(losses, present)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(weights, expected_weights)


def test_uw_matches_the_hand_computed_kendall_loss():
    balancer = ready(UW, ["a", "b"])
    with torch.no_grad():
        balancer.log_vars.copy_(torch.tensor([0.5, -1.0]))
    losses = torch.tensor([2.0, 3.0])
    total, weights = balancer(losses, torch.tensor([True, True]))
    # torchjd's (Kendall's Eq. 7) convention: ½ e^{-s} L + ½ s.
    expected = 0.5 * math.exp(-0.5) * 2.0 + 0.25 + 0.5 * math.exp(1.0) * 3.0 - 0.5
    assert total.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(weights, torch.tensor([0.5 * math.exp(-0.5), 0.5 * math.exp(1.0)]))
    total.backward()  # ∂/∂s = ½ (1 − e^{-s} L)
    grad = balancer.log_vars.grad
    assert grad[0].item() == pytest.approx(0.5 * (1 - math.exp(-0.5) * 2.0), rel=1e-6)
    assert grad[1].item() == pytest.approx(0.5 * (1 - math.exp(1.0) * 3.0), rel=1e-6)
    # one K-vector parameter: one tensor for the optimizer, whatever the number of tasks
    assert [name for name, _ in balancer.named_parameters()] == ["scalarizer.log_var"]


def test_uw_absent_task_leaves_its_log_variance_alone():
    balancer = ready(UW, ["a", "b"])
    total, _ = balancer(torch.tensor([2.0, 0.0]), torch.tensor([True, False]))
    total.backward()
    assert balancer.log_vars.grad[1].item() == 0
    assert balancer.log_vars.grad[0].item() == pytest.approx(0.5 * (1 - 2.0), rel=1e-6)
    assert total.item() == pytest.approx(0.5 * 2.0, rel=1e-6)  # the absent task's ½ s term is left out


@pytest.mark.parametrize("cls", [UW, IMTLL])
def test_an_absent_task_is_left_out_exactly(cls):
    """Masking one scalarizer over K tasks equals the same method on the present tasks alone."""
    full, subset = ready(cls, ["a", "b", "c"]), ready(cls, ["a", "c"])
    (parameter,), (sub_parameter,) = list(full.parameters()), list(subset.parameters())
    with torch.no_grad():
        parameter.copy_(torch.tensor([0.4, -0.7, 0.2]))
        sub_parameter.copy_(torch.tensor([0.4, 0.2]))
    total, weights = full(torch.tensor([1.5, 0.0, 2.5]), torch.tensor([True, False, True]))
    expected, expected_weights = subset(torch.tensor([1.5, 2.5]), torch.tensor([True, True]))
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(weights[[0, 2]], expected_weights)
    assert weights[1] == 0
    total.backward()
    expected.backward()
    torch.testing.assert_close(parameter.grad[[0, 2]], sub_parameter.grad)
    assert parameter.grad[1] == 0


@pytest.mark.parametrize("cls", [UW, IMTLL])
def test_one_parameter_tensor_whatever_the_number_of_tasks(cls):
    balancer = ready(cls, [f"t{k}" for k in range(10)])
    assert [tuple(p.shape) for p in balancer.parameters()] == [(10,)]


def test_per_task_scalarizer_refuses_a_scalarizer_without_a_neutral_term():
    from torch import nn

    from lightning_mtl.balancers.base import MaskedScalarizer

    class Offset(nn.Module):  # e^s L + 1: not 0 at L = 0, s = 0, so an absent task could not be masked
        def __init__(self, k):
            super().__init__()
            self.scale = nn.Parameter(torch.zeros(k))

        def forward(self, values):
            return (self.scale.exp() * values).sum() + 1

    class Bad(MaskedScalarizer):
        scalarizer_class = Offset

    with pytest.raises(TypeError, match="not 0 at a zero loss"):
        ready(Bad)


def test_imtll_matches_the_hand_computed_loss():
    balancer = ready(IMTLL, ["a", "b"])
    with torch.no_grad():
        balancer.log_scales[0] = 0.3
    total, weights = balancer(torch.tensor([2.0, 3.0]), torch.tensor([True, True]))
    assert total.item() == pytest.approx(math.exp(0.3) * 2.0 - 0.3 + 3.0, rel=1e-6)
    torch.testing.assert_close(weights, torch.tensor([math.exp(0.3), 1.0]))


def test_gls_is_the_geometric_mean_of_present_losses():
    balancer = ready(GLS, ["a", "b", "c"])
    total, weights = balancer(torch.tensor([2.0, 8.0, 0.0]), torch.tensor([True, True, False]))
    assert total.item() == pytest.approx(4.0, rel=1e-6)  # (2·8)^(1/2)
    torch.testing.assert_close(weights, torch.tensor([4.0 / (2 * 2.0), 4.0 / (2 * 8.0), 0.0]))
    total, _ = balancer(torch.tensor([1.0, 2.0, 4.0]), torch.ones(3, dtype=torch.bool))
    assert total.item() == pytest.approx(2.0, rel=1e-6)  # (1·2·4)^(1/3)


def test_stch_matches_its_formula():
    balancer = STCH(mu=0.5, reference=[0.0, 1.0])
    balancer.setup(["a", "b"])
    losses = torch.tensor([1.0, 3.0])
    total, _ = balancer(losses, torch.tensor([True, True]))
    y = 0.5 * (losses - torch.tensor([0.0, 1.0]))
    assert total.item() == pytest.approx(0.5 * torch.logsumexp(y / 0.5, 0).item(), rel=1e-6)
    alone, _ = balancer(losses, torch.tensor([False, True]))
    assert alone.item() == pytest.approx(0.5 * (3.0 - 1.0), rel=1e-6)


def test_dwa_weights_follow_the_paper_after_two_epochs():
    balancer = DWA(temperature=2.0)
    balancer.setup(["a", "b", "c"])
    everyone = torch.ones(3, dtype=torch.bool)
    epochs = [
        [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])],  # means 2, 2, 2
        [torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 1.0, 2.0])],  # means 1, 1.5, 3
    ]
    for epoch in epochs:
        for losses in epoch:
            _, weights = balancer(losses, everyone)
            torch.testing.assert_close(weights, torch.ones(3))  # uniform for the first two epochs
        balancer.on_train_epoch_end()
    _, weights = balancer(torch.tensor([5.0, 5.0, 5.0]), everyone)
    rates = torch.tensor([1.0 / 2.0, 1.5 / 2.0, 3.0 / 2.0])
    torch.testing.assert_close(weights, 3 * torch.softmax(rates / 2.0, 0))
    assert weights.sum().item() == pytest.approx(3.0)


def test_dwa_averages_a_task_over_the_steps_it_is_present():
    balancer = ready(DWA, ["a", "b"])
    balancer(torch.tensor([1.0, 4.0]), torch.tensor([True, True]))
    balancer(torch.tensor([3.0, 0.0]), torch.tensor([True, False]))
    balancer.on_train_epoch_end()
    torch.testing.assert_close(balancer.history[1], torch.tensor([2.0, 4.0]))


def test_dwa_state_uses_the_all_reduced_losses():
    balancer = ready(DWA, ["a", "b"])
    balancer.all_reduce_mean = lambda tensor: tensor * 2  # a stand-in collective
    balancer(torch.tensor([1.0, 3.0]), torch.tensor([True, True]))
    # sums and counts are reduced together: (2·L)/(2·1) = L.
    torch.testing.assert_close(balancer.loss_sum, torch.tensor([1.0, 3.0]))
    balancer.all_reduce_mean = lambda tensor: torch.stack([tensor[0] + 1, tensor[1]])
    balancer(torch.tensor([1.0, 3.0]), torch.tensor([True, True]))
    torch.testing.assert_close(balancer.loss_sum, torch.tensor([3.0, 7.0]))


def test_rlw_weights_sum_to_one_and_are_reproducible_by_seed():
    first, second, other = RLW(seed=3), RLW(seed=3), RLW(seed=4)
    for balancer in (first, second, other):
        balancer.setup(["a", "b", "c"])
    losses, everyone = torch.tensor([1.0, 2.0, 3.0]), torch.ones(3, dtype=torch.bool)
    draws = [first(losses, everyone)[1] for _ in range(3)]
    for weights in draws:
        assert weights.sum().item() == pytest.approx(1.0) and (weights > 0).all()
    assert not torch.equal(draws[0], draws[1])
    for expected in draws:
        torch.testing.assert_close(second(losses, everyone)[1], expected)
    assert not torch.equal(other(losses, everyone)[1], draws[0])
    _, weights = first(losses, torch.tensor([True, False, True]))
    assert weights[1] == 0 and weights.sum().item() == pytest.approx(1.0)


def test_rlw_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    ready(RLW)(torch.ones(3), torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(torch.rand(3), expected)


def test_famo_weights_and_logit_update_by_hand():
    balancer = FAMO(lr=0.1, weight_decay=0.0)
    balancer.setup(["a", "b"])
    everyone = torch.ones(2, dtype=torch.bool)
    total, weights = balancer(torch.tensor([1.0, 4.0]), everyone)
    # z = (½, ½); w_k ∝ z_k / L_k, normalised: (1, ¼) / 1.25.
    torch.testing.assert_close(weights, torch.tensor([0.8, 0.2]))
    balancer.after_optimizer_step(torch.tensor([0.5, 3.0]))
    # δ = (log 2, log 4/3); ∇ξ = z ⊙ (δ − zᵀδ) = ±¼ (log 2 − log 4/3); Adam's first step is lr · sign.
    torch.testing.assert_close(balancer.logits, torch.tensor([-0.1, 0.1]))
    assert FAMO.needs_losses_after_step


def test_famo_after_step_uses_the_all_reduced_losses_and_skips_absent_tasks():
    balancer = ready(FAMO, ["a", "b", "c"])
    balancer(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([True, False, True]))
    balancer.after_optimizer_step(torch.tensor([0.9, 0.0, 1.0]))
    assert balancer.logits[1] == 0 and torch.isfinite(balancer.logits).all()
    assert balancer.logits[0] > 0 > balancer.logits[2]  # task c improved more: it loses weight


def test_famo_logit_of_a_task_absent_from_the_step_stays_exactly():
    """Once task c has Adam momentum (and with weight decay), steps without c leave its logit as it was."""
    balancer = FAMO(lr=0.1, weight_decay=0.1)
    balancer.setup(["a", "b", "c"])
    for _ in range(3):
        losses = torch.tensor([1.0, 1.2, 0.8])
        balancer(losses, torch.ones(3, dtype=torch.bool))
        balancer.after_optimizer_step(losses * torch.tensor([0.5, 0.9, 0.99]))
    before = balancer.logits.clone()
    without_c = torch.tensor([True, True, False])
    for _ in range(3):
        balancer(torch.tensor([1.0, 1.0, 0.0]), without_c)
        balancer.after_optimizer_step(torch.tensor([0.8, 0.9, 0.0]))
    assert torch.equal(balancer.logits[2], before[2])
    assert not torch.equal(balancer.logits[:2], before[:2])  # the present tasks did take their updates


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", LOSS_METHODS)
def test_half_precision_losses(cls, dtype):
    balancer = ready(cls)
    losses = torch.tensor([0.5, 1.5, 3.0], dtype=dtype, requires_grad=True)
    total, weights = balancer(losses, torch.tensor([True, False, True]))
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(weights).all() and torch.isfinite(losses.grad).all()
    if balancer.needs_losses_after_step:
        balancer.after_optimizer_step(losses.detach() * 0.9)


def _state(balancer):
    """Everything a balancer keeps: its state_dict tensors, and any generator state in it."""
    state = {}
    for key, value in balancer.state_dict().items():
        if torch.is_tensor(value):
            state[key] = value.clone()
        elif isinstance(value, dict):
            state[key] = copy.deepcopy(value)
    return state


def _same(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("cls", LOSS_METHODS, ids=lambda cls: cls.__name__)
def test_a_loss_balancer_whose_forward_changes_state_declares_it(cls):
    """The module checks the losses before such a forward (a skipped step must not reach the state)."""
    balancer = cls()
    balancer.setup(["a", "b", "c"])
    before = _state(balancer)
    balancer(torch.tensor([0.5, 1.0, 2.0]), torch.ones(3, dtype=torch.bool))
    changed = not _same(before, _state(balancer))
    assert changed == cls.forward_changes_state


def _two_ranks(cls, losses, present):
    """Each of two "ranks" of ``cls`` with an all_reduce_mean that averages with the other's contribution."""
    ranks = [cls() for _ in losses]
    for rank, balancer in enumerate(ranks):
        balancer.setup(["a", "b"])
        other = 1 - rank
        mask = present[other].to(losses[other].dtype)
        received = torch.stack([losses[other] * mask, mask])  # what the other rank contributes to the reduction
        balancer.all_reduce_mean = lambda t, received=received: (t + received) / 2
    return ranks


@pytest.mark.parametrize("cls", [GLS, STCH], ids=lambda cls: cls.__name__)
def test_under_ddp_every_rank_weighs_by_the_global_losses(cls):
    """A nonlinear scalarization on each rank's own losses gives each rank other weights (GLS, STCH)."""
    losses = [torch.tensor([0.5, 2.0]), torch.tensor([1.5, 1.0])]
    present = [torch.ones(2, dtype=torch.bool)] * 2
    single = cls()
    single.setup(["a", "b"])
    _, expected = single((losses[0] + losses[1]) / 2, present[0])  # one process on the global batch
    for rank, balancer in enumerate(_two_ranks(cls, losses, present)):
        value, weights = balancer(losses[rank], present[rank])
        torch.testing.assert_close(weights, expected)
        torch.testing.assert_close(value, expected @ losses[rank])


def test_rlw_under_ddp_normalises_over_the_tasks_present_on_any_rank():
    """A rank without task b's labels must not hand b's weight to a (the ranks would use other weights)."""
    losses = [torch.tensor([0.5, 0.0]), torch.tensor([1.5, 1.0])]
    present = [torch.tensor([True, False]), torch.tensor([True, True])]
    draws = torch.randn(2, generator=torch.Generator().manual_seed(0))
    everywhere = torch.softmax(draws, dim=0)
    rank0, rank1 = _two_ranks(RLW, losses, present)
    _, weights0 = rank0(losses[0], present[0])
    _, weights1 = rank1(losses[1], present[1])
    torch.testing.assert_close(weights1, everywhere)
    torch.testing.assert_close(weights0, torch.stack([everywhere[0], torch.tensor(0.0)]))  # a keeps its global weight
