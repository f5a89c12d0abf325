"""Every balancer inside a real Trainer: learning, mixed precision, GradScaler, resume."""

import copy
import importlib.util

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from conftest import quiet_trainer
from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.architectures import MLP, RegressionHead
from lightning_mtl.balancers import BALANCERS
from lightning_mtl.datasets import MultiDigits
from test_module import SharedInput, make_module, make_tasks

pytestmark = pytest.mark.slow

HAS_SOLVERS = importlib.util.find_spec("cvxpy") is not None
# AutoLambda needs a data module with a meta split: it is trained in tests/balancers/test_autolambda.py
AVAILABLE = sorted(
    name for name in BALANCERS
    if (HAS_SOLVERS or name not in ("cagrad", "nashmtl")) and not BALANCERS[name].needs_meta_batches
)  # fmt: skip
GRADIENT_LEVEL = [
    name for name in AVAILABLE if BALANCERS[name].needs != "losses" and BALANCERS[name].supports_representation
]
STATEFUL = ["uw", "dwa", "famo", "gradvac", "gradnorm", "rlw", "graddrop", "dbmtl", "imtll"]
if HAS_SOLVERS:
    STATEFUL.append("nashmtl")  # warm start and the weights kept between solves


def digits_model(balancer, gradients="parameters"):
    torch.manual_seed(0)
    tasks = [
        Task(name, nn.Linear(128, 10), nn.CrossEntropyLoss(), {"acc": MulticlassAccuracy(10, average="micro")})
        for name in ("left", "right")
    ] + [Task("sum", RegressionHead(128), nn.MSELoss())]
    return MultiTaskModule(
        MLP(240, [256, 128]), tasks, balancer=balancer, gradients=gradients,
        optimizer=lambda p: torch.optim.Adam(p, lr=5e-3),
    )  # fmt: skip


@pytest.fixture(scope="module")
def digit_splits():
    return MultiDigits("train", size=4000, seed=0), MultiDigits("val", size=2000, seed=0)


@pytest.fixture
def digits(digit_splits):
    """Fresh loaders per test: the shuffle order must not depend on which tests ran before."""
    train, val = digit_splits
    generator = torch.Generator().manual_seed(0)
    return DataLoader(train, batch_size=32, shuffle=True, generator=generator), DataLoader(val, batch_size=500)


@pytest.mark.parametrize("name", AVAILABLE)
def test_every_balancer_learns_multidigits_above_chance_in_one_epoch(name, digits):
    assert_learns_above_chance(digits_model(name), digits)


def assert_learns_above_chance(model, digits):
    """One epoch (125 steps); chance accuracy is 0.10 ± 0.0067 on 2000 samples, so 0.125 is > 3.5σ above it."""
    trainer = quiet_trainer(max_epochs=1)
    untrained = trainer.validate(model, digits[1], verbose=False)[0]
    trainer.fit(model, digits[0])
    results = trainer.validate(model, digits[1], verbose=False)[0]
    assert results["val/left/acc"] > 0.125 and results["val/right/acc"] > 0.125, results
    assert results["val/loss"] < untrained["val/loss"] - 0.1, (untrained, results)


@pytest.mark.parametrize("name", GRADIENT_LEVEL)
def test_gradient_balancers_learn_in_representation_mode(name, digits):
    assert_learns_above_chance(digits_model(name, gradients="representation"), digits)


@pytest.mark.parametrize("name", AVAILABLE)
def test_bf16_mixed_keeps_every_balancer_finite(name):
    module = make_module(balancer=name)
    trainer = quiet_trainer(max_epochs=2, precision="bf16-mixed")
    trainer.fit(module, DataLoader(SharedInput(128), batch_size=32))
    assert trainer.global_step == 8
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert all(torch.isfinite(t).all() for t in module.balancer.state_dict().values() if torch.is_tensor(t))


@pytest.mark.parametrize("name", GRADIENT_LEVEL)
def test_bf16_mixed_keeps_gradient_balancers_finite_in_representation_mode(name):
    """The views' backward gets bf16 cotangents: balanced in float32, handed back to the backbone in bf16."""
    module = make_module(balancer=name, gradients="representation")
    before = [p.detach().clone() for p in module.backbone.parameters()]
    trainer = quiet_trainer(max_epochs=2, precision="bf16-mixed")
    trainer.fit(module, DataLoader(SharedInput(128), batch_size=32))
    assert trainer.global_step == 8
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert all(not torch.equal(p, p0) for p, p0 in zip(module.backbone.parameters(), before))  # it trained


def scaler_trainer(init_scale, **kwargs):
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return quiet_trainer(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], **kwargs), scaler


@pytest.mark.parametrize("name", ["mgda", "upgrad", "graddrop"])
def test_grad_scaler_trains_gradient_balancers_with_finite_parameters(name):
    module = make_module(balancer=name)
    trainer, scaler = scaler_trainer(2.0**8, max_epochs=2)
    trainer.fit(module, DataLoader(SharedInput(128), batch_size=32))
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("mode", ["parameters", "representation"])
def test_grad_scaler_unscales_the_jacobian_before_balancing(mode):
    """The same batch gives the same weights under a 2^12 loss scale as without scaling."""
    x, labels = SharedInput(16).x, {"cls": SharedInput(16).cls, "reg": SharedInput(16).reg}
    plain = make_module(tasks=make_tasks(metrics=False), balancer="mgda", gradients=mode)
    scaled = make_module(tasks=make_tasks(metrics=False), balancer="mgda", gradients=mode)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled._trainer = type("T", (), {"precision_plugin": type("P", (), {"scaler": scaler})()})()
    assert scaled._loss_scale() == 2.0**12  # read from Lightning's precision plugin
    scaled._trainer = None
    scaled._loss_scale = lambda: 2.0**12
    seen = {}
    for module, scale in ((plain, 1.0), (scaled, 2.0**12)):
        original = module.balancer.weights
        module.balancer.weights = lambda g, l=None, p=None, m=module, f=original, **kw: (seen.setdefault(id(m), g), f(g, l, p, **kw))[1]
        (module.training_step((x, labels), 0) * scale).backward()  # what the GradScaler does to the loss
    # the Gramian the balancer sees is the unscaled one (scaled, it would be 2^24 times larger)
    torch.testing.assert_close(seen[id(plain)], seen[id(scaled)], rtol=1e-4, atol=1e-7)
    # and the gradients are the scaled ones, for the GradScaler to unscale
    for p_plain, p_scaled in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(p_scaled.grad, p_plain.grad * 2.0**12, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["parameters", "representation"])
def test_grad_scaler_overflow_skips_the_step_and_leaves_balancer_state_alone(mode):
    module = make_module(tasks=make_tasks(metrics=False), balancer="gradvac", gradients=mode)
    before = [p.detach().clone() for p in module.parameters()]
    state_before = {k: v.clone() for k, v in module.balancer.state_dict().items() if torch.is_tensor(v)}
    trainer, scaler = scaler_trainer(2.0**127, max_steps=1)  # overflows every fp16 gradient
    trainer.fit(module, DataLoader(SharedInput(16), batch_size=16))
    assert scaler.get_scale() < 2.0**127  # the scaler saw inf and backed off
    for p, p0 in zip(module.parameters(), before):
        torch.testing.assert_close(p.detach(), p0, rtol=0, atol=0)  # the step was skipped
    for key, value in module.balancer.state_dict().items():
        if key in state_before:
            torch.testing.assert_close(value, state_before[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", STATEFUL)
def test_resume_equals_straight_run(tmp_path, name):
    """4 epochs straight equal 2 epochs, a checkpoint, and 2 resumed epochs (balancer state included)."""
    data = DataLoader(SharedInput(96), batch_size=32)  # no shuffling: identical batches in both runs
    straight = make_module(balancer=name)
    quiet_trainer(max_epochs=4).fit(straight, data)

    first = make_module(balancer=name)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(max_epochs=2, enable_checkpointing=True, callbacks=[checkpoint]).fit(first, data)
    resumed = make_module(balancer=name)
    quiet_trainer(max_epochs=4).fit(resumed, data, ckpt_path=tmp_path / "last.ckpt")

    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for (key, a), b in zip(straight.balancer.state_dict().items(), resumed.balancer.state_dict().values()):
        if torch.is_tensor(a):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


class RecordingFAMO(BALANCERS["famo"]):
    """FAMO that records the losses of every forward and of every after-step call."""

    def __init__(self):
        super().__init__()
        self.forward_losses, self.after_losses, self.before_at_update = [], [], []

    def forward(self, losses, present):
        self.forward_losses.append(losses.detach().clone())
        return super().forward(losses, present)

    def after_optimizer_step(self, losses):
        self.after_losses.append(losses.clone())
        self.before_at_update.append(self.losses_before.clone())
        super().after_optimizer_step(losses)


def task_losses(module, x, labels):
    """The module's (unweighted) task losses on one batch, computed by hand."""
    with torch.no_grad():
        out = module(x)
        return torch.stack([nn.functional.cross_entropy(out["cls"], labels["cls"]), nn.functional.mse_loss(out["reg"], labels["reg"])])


@pytest.mark.parametrize("accumulate", [1, 3])
def test_famo_updates_once_per_optimizer_step_from_the_last_micro_batch(accumulate):
    """Under accumulation FAMO compares the last micro-batch's losses before and after the optimizer step."""
    data = SharedInput(16 * accumulate * 2)
    module = make_module(tasks=make_tasks(metrics=False), balancer=RecordingFAMO())
    quiet_trainer(max_steps=1, accumulate_grad_batches=accumulate).fit(module, DataLoader(data, batch_size=16))
    famo = module.balancer
    assert len(famo.forward_losses) == accumulate and len(famo.after_losses) == 1
    last = slice(16 * (accumulate - 1), 16 * accumulate)
    x, labels = data.x[last], {"cls": data.cls[last], "reg": data.reg[last]}
    torch.testing.assert_close(famo.before_at_update[0], famo.forward_losses[-1])  # the last micro-batch, before
    torch.testing.assert_close(famo.after_losses[0], task_losses(module, x, labels))  # the same one, after the step
    assert not torch.allclose(famo.after_losses[0], famo.forward_losses[-1])  # the step changed the model
    assert not torch.equal(famo.logits, torch.zeros(2))  # and the logits took their update


def test_gradnorm_updates_its_weights_once_per_micro_batch():
    """Balancing is per micro-batch, so is GradNorm's weight update (documented in docs/balancers.md)."""
    module = make_module(tasks=make_tasks(metrics=False), balancer="gradnorm")
    quiet_trainer(max_steps=2, accumulate_grad_batches=3).fit(module, DataLoader(SharedInput(16 * 6), batch_size=16))
    (state,) = module.balancer.get_extra_state()["optimizer"]["state"].values()
    assert int(state["step"]) == 6


@pytest.mark.parametrize("name, mode", [("gradvac", "parameters"), ("gradnorm", "representation"), ("dwa", "parameters")])
def test_a_step_the_grad_scaler_skips_leaves_the_balancer_state_alone(name, mode):
    """The scaler can find inf where the balancer did not look (heads, the backbone's own fp16 backward)."""
    module = make_module(tasks=make_tasks(metrics=False), balancer=name, gradients=mode,
                         optimizer=lambda p: torch.optim.SGD(p, lr=0.1))  # fmt: skip
    records = []

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.parameters = [p.detach().clone() for p in pl_module.parameters()]
            self.state = copy.deepcopy(pl_module.balancer.state_dict())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            moved = any(not torch.equal(p, p0) for p, p0 in zip(pl_module.parameters(), self.parameters))
            records.append((moved, _same_state(self.state, pl_module.balancer.state_dict())))

    trainer, scaler = scaler_trainer(2.0**24, max_steps=12, callbacks=[Watch()])
    trainer.fit(module, DataLoader(SharedInput(16 * 12), batch_size=16))
    skipped = [same for moved, same in records if not moved]
    assert skipped and any(moved for moved, _ in records)  # the scaler skipped some steps and trained on others
    assert all(skipped)  # every skipped step left the balancer's state as it was


def _same_state(a, b):
    if torch.is_tensor(a):  # NaN equals NaN here (DWA's history starts as NaN)
        return torch.is_tensor(b) and a.shape == b.shape and bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same_state, a, b))
    return a == b
