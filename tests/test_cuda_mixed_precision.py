"""``precision="16-mixed"`` on a CUDA device: Lightning's own GradScaler around the balancers.

These run only where CUDA is available (a lent GPU machine); on CPU the same paths are covered by the
CPU GradScaler tests in ``test_balancers_training.py``. They check what the CPU tests cannot: fp16
autocast on CUDA kernels, the CUDA GradScaler's unscale/inf check, the balancer's state on the
device, and the host round trip of the K x K weighting.
"""

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from conftest import quiet_trainer
from test_module import SharedInput, make_module, make_tasks

from lightning_mtl.balancers import BALANCERS, GramianBalancer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class RecordLossScale(Callback):
    """The GradScaler's scale seen by the module at each optimizer step."""

    def __init__(self) -> None:
        self.scales: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.scales.append(pl_module._loss_scale())


GRADIENT_LEVEL = sorted(name for name, cls in BALANCERS.items() if cls.needs != "losses")
GRAMIAN = sorted(name for name, cls in BALANCERS.items() if issubclass(cls, GramianBalancer))


@pytest.mark.parametrize("name", GRAMIAN)
def test_gramian_weights_of_a_cuda_gramian_equal_those_of_its_cpu_copy(name):
    generator = torch.Generator().manual_seed(0)
    jacobian = torch.randn(3, 40, generator=generator)
    jacobian[2] = -0.5 * jacobian[0] + 0.1 * jacobian[2]  # a conflict, so the methods do not all agree
    gramian = jacobian @ jacobian.T
    on_cpu, on_cuda = BALANCERS[name](), BALANCERS[name]()
    for balancer in (on_cpu, on_cuda):
        balancer.setup(["a", "b", "c"])
    on_cuda.cuda()
    losses = torch.tensor([0.5, 1.0, 2.0])
    present = torch.ones(3, dtype=torch.bool)
    for _ in range(3):  # stateful methods (GradVac's targets, Nash-MTL's warm start, GradNorm) keep state
        expected = on_cpu.weights(gramian, losses, present)
        weights = on_cuda.weights(gramian.cuda(), losses.cuda(), present.cuda())
        assert weights.device.type == "cuda"
        torch.testing.assert_close(weights.cpu(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["parameters", "representation"])
@pytest.mark.parametrize("name", GRADIENT_LEVEL)
def test_16_mixed_on_cuda_trains_with_finite_parameters(name, mode):
    if mode == "representation" and not BALANCERS[name].supports_representation:
        pytest.skip(f"{name} does not support representation mode")
    module = make_module(balancer=name, gradients=mode)
    before = [p.detach().clone() for p in module.backbone.parameters()]
    record = RecordLossScale()
    trainer = quiet_trainer(accelerator="gpu", precision="16-mixed", max_epochs=2, callbacks=[record])
    trainer.fit(module, DataLoader(SharedInput(128), batch_size=32))
    assert record.scales and all(scale > 1.0 for scale in record.scales)  # the GradScaler was active
    assert all(torch.isfinite(p).all() for p in module.parameters())
    after = [p.detach().cpu() for p in module.backbone.parameters()]
    assert all(not torch.equal(p, p0) for p, p0 in zip(after, before))  # it trained


@pytest.mark.parametrize("mode", ["parameters", "representation"])
def test_16_mixed_on_cuda_overflow_skips_the_step_and_leaves_balancer_state_alone(mode):
    module = make_module(tasks=make_tasks(metrics=False), balancer="gradvac", gradients=mode)
    before = [p.detach().clone() for p in module.parameters()]
    state_before = {k: v.clone() for k, v in module.balancer.state_dict().items() if torch.is_tensor(v)}
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**127)  # overflows every fp16 gradient
    trainer = quiet_trainer(accelerator="gpu", plugins=[MixedPrecision("16-mixed", "cuda", scaler=scaler)], max_steps=1)
    trainer.fit(module, DataLoader(SharedInput(16), batch_size=16))
    assert scaler.get_scale() < 2.0**127  # the scaler saw inf and backed off
    for p, p0 in zip(module.parameters(), before):
        torch.testing.assert_close(p.detach().cpu(), p0, rtol=0, atol=0)  # the step was skipped
    for key, value in module.balancer.state_dict().items():
        if key in state_before:
            torch.testing.assert_close(value.cpu(), state_before[key], rtol=0, atol=0)
