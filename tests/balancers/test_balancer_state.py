"""State: every stateful balancer resumes exactly from ``state_dict()``, saved with ``torch.save``."""

import io

import pytest
import torch

from lightning_mtl.balancers import (
    DBMTL, DWA, FAMO, IMTLL, RLW, UW, Balancer, GradDrop, GradNorm, GradVac, NashMTL, PCGrad,
)  # fmt: skip

from balancer_helpers import HAS_SOLVERS

NAMES = ["a", "b", "c"]
EVERYONE = torch.ones(3, dtype=torch.bool)


def _losses(step: int) -> torch.Tensor:
    return torch.tensor([1.0, 2.0, 3.0]) / (1 + 0.1 * step) + torch.tensor([0.0, 0.05, 0.1]) * (step % 3)


def _gradients(step: int) -> torch.Tensor:
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(step))


def _step(balancer: Balancer, step: int) -> torch.Tensor:
    """One training step of the balancer alone; returns what the module would use."""
    if balancer.needs == "losses":
        present = EVERYONE if step % 4 else torch.tensor([True, False, True])
        losses = _losses(step) * present
        total, weights = balancer(losses, present)
        if isinstance(balancer, (UW, IMTLL)):  # learned parameters: one SGD step
            total.backward()
            with torch.no_grad():
                for parameter in balancer.parameters():
                    parameter -= 0.1 * parameter.grad
                    parameter.grad = None
        if balancer.needs_losses_after_step:
            balancer.after_optimizer_step(losses * 0.9)
        if step % 2:
            balancer.on_train_epoch_end()
        return torch.cat([total.detach().reshape(1), weights])
    G = _gradients(step)
    if isinstance(balancer, GradNorm):
        return balancer(G, _losses(step))
    return balancer(G)


def _round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _build(cls) -> Balancer:
    balancer = cls()
    balancer.setup(NAMES)
    return balancer


STATEFUL = [FAMO, DWA, UW, IMTLL, RLW, GradVac, GradNorm, GradDrop, DBMTL, PCGrad]


@pytest.mark.parametrize("cls", STATEFUL)
def test_state_dict_round_trip_resumes_exactly(cls):
    original = _build(cls)
    for step in range(5):
        _step(original, step)
    state = _round_trip(original.state_dict())
    resumed = _build(cls)
    resumed.load_state_dict(state)
    for step in range(5, 9):
        torch.testing.assert_close(_step(resumed, step), _step(original, step), rtol=0, atol=0)


@pytest.mark.parametrize("cls", STATEFUL + ([NashMTL] if HAS_SOLVERS else []))
def test_a_loaded_state_is_a_copy_not_shared_with_the_source(cls):
    """``load_state_dict`` in memory (no ``torch.save``): stepping the source, or another balancer loaded
    from the same dictionary, leaves the copy alone; the copy then continues exactly as the source did."""
    source = _build(cls)
    for step in range(5):
        _step(source, step)
    state = source.state_dict()
    copy, other = _build(cls), _build(cls)
    copy.load_state_dict(state)
    other.load_state_dict(state)
    expected = [_step(source, step) for step in range(5, 9)]
    for step in range(5, 9):
        _step(other, step)
    for step, output in zip(range(5, 9), expected):
        torch.testing.assert_close(_step(copy, step), output, rtol=0, atol=0, msg=f"step {step}")


@pytest.mark.parametrize("cls", STATEFUL)
def test_a_fresh_instance_differs_from_a_trained_one(cls):
    """The round trip above is not vacuous: the state changes what comes next."""
    trained, fresh = _build(cls), _build(cls)
    for step in range(5):
        _step(trained, step)
    outputs = [(_step(trained, step), _step(fresh, step)) for step in range(5, 9)]
    assert any(not torch.equal(a, b) for a, b in outputs)


@pytest.mark.parametrize("cls", STATEFUL)
def test_reset_returns_to_the_initial_state(cls):
    balancer, fresh = _build(cls), _build(cls)
    for step in range(5):
        _step(balancer, step)
    balancer.reset()
    for step in range(5, 9):
        torch.testing.assert_close(_step(balancer, step), _step(fresh, step), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [RLW, GradDrop, PCGrad, GradVac])
def test_generator_state_is_saved(cls):
    first, second = _build(cls), _build(cls)
    assert torch.equal(_step(first, 1), _step(second, 1))  # same seed, same draws
    assert "_extra_state" in first.state_dict()
    reloaded = _build(cls)
    reloaded.load_state_dict(_round_trip(first.state_dict()))
    assert torch.equal(_step(reloaded, 2), _step(first, 2))  # the stream continues after loading
    restarted = _build(cls)
    assert not torch.equal(restarted.generator.get_state(), reloaded.generator.get_state())  # nor restarts


def test_a_different_seed_gives_different_draws():
    G = _gradients(0)
    assert not torch.equal(GradDrop(seed=1)(G), GradDrop(seed=2)(G))


def test_stateless_balancers_have_no_extra_state():
    from lightning_mtl.balancers import MGDA, Static, UPGrad

    for cls in (Static, MGDA, UPGrad):
        assert "_extra_state" not in _build(cls).state_dict()


def test_famo_private_optimizer_state_is_a_snapshot_and_follows_a_dtype_change():
    balancer = _build(FAMO)
    for step in range(3):
        _step(balancer, step)
    saved = balancer.state_dict()["_extra_state"]["optimizer"]
    moment = saved["state"][0]["exp_avg"].clone()
    _step(balancer, 3)
    torch.testing.assert_close(saved["state"][0]["exp_avg"], moment, rtol=0, atol=0)  # not aliased to live state
    balancer.double()  # the logits are a new tensor: the optimizer is rebuilt, its state carried over
    balancer(_losses(4).double(), EVERYONE)
    balancer.after_optimizer_step(_losses(4).double() * 0.9)
    state = balancer.state_dict()["_extra_state"]["optimizer"]["state"][0]
    assert float(state["step"]) == 5 and state["exp_avg"].dtype == torch.float64
    assert balancer.logits.dtype == torch.float64


def test_private_adam_steps_like_torch_adam_and_resumes_from_its_state():
    """FAMO's and GradNorm's private optimizer: the same updates as ``torch.optim.Adam`` (single tensor),
    also after its state went through ``state_dict`` / ``load_state_dict`` (a checkpoint)."""
    from lightning_mtl.balancers._utils import PrivateAdam

    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, generator=generator) for _ in range(20)]
    reference = torch.ones(4)
    adam = torch.optim.Adam([reference], lr=0.025, weight_decay=0.01, foreach=False)
    ours, private = torch.ones(4), PrivateAdam(lr=0.025, weight_decay=0.01)
    for i, grad in enumerate(grads):
        reference.grad = grad.clone()
        adam.step()
        private.step(ours, grad)
        if i == 9:  # resume into a fresh tensor and a fresh PrivateAdam
            state, ours = private.state_dict(), ours.clone()
            private = PrivateAdam(lr=0.025, weight_decay=0.01)
            private.load_state_dict(state)
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7, msg=f"step {i}")
    assert ours.grad is None
