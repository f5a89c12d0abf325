"""`MultiTaskModule.last_step` and `request_gramian`: the public view of a training step for callbacks."""

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from conftest import quiet_trainer
from lightning_mtl import StepView
from lightning_mtl.balancers import MGDA, UPGrad
from test_gradient_balancing import batch, per_task_gradients
from test_module import SharedInput, make_module, make_tasks


def backbone_parameters(z, module):
    return list(module.backbone.parameters())


def reference_gramians(module, x, labels):
    """(losses, parameter Gramian, representation Gramian) by one backward per task."""
    losses, jacobian, z = per_task_gradients(module, x, labels, lambda z: list(module.backbone.parameters()))
    _, representation, _ = per_task_gradients(module, x, labels, lambda z: [z])
    return losses.detach(), jacobian @ jacobian.T, representation @ representation.T


def test_last_step_is_none_before_any_training_step():
    assert make_module().last_step is None


@pytest.mark.parametrize("mode", ["parameters", "representation"])
def test_static_step_has_losses_and_weights_and_no_gramian_unless_asked(mode):
    module = make_module(tasks=make_tasks(metrics=False, cls_weight=0.5, reg_weight=2.0), gradients=mode)
    x, labels = batch()
    losses, _, _ = reference_gramians(module, x, labels)
    module.training_step((x, labels), 3).backward()
    step = module.last_step
    assert isinstance(step, StepView)
    assert step.task_names == ("cls", "reg") and step.batch_idx == 3 and not step.skipped
    torch.testing.assert_close(step.losses, losses)
    assert step.present.tolist() == [True, True]
    torch.testing.assert_close(step.weights, torch.tensor([0.5, 2.0]))
    assert step.gramian is None


@pytest.mark.parametrize("mode", ["parameters", "representation"])
def test_requested_gramian_of_a_static_step_is_exact_and_leaves_the_update_unchanged(mode):
    plain = make_module(tasks=make_tasks(metrics=False), gradients=mode)
    asked = copy.deepcopy(plain)
    x, labels = batch()
    _, parameter_gramian, representation_gramian = reference_gramians(plain, x, labels)
    plain.training_step((x, labels), 0).backward()
    asked.request_gramian()
    asked.training_step((x, labels), 0).backward()
    expected = parameter_gramian if mode == "parameters" else representation_gramian
    torch.testing.assert_close(asked.last_step.gramian, expected, rtol=1e-5, atol=1e-7)
    for p, q in zip(plain.parameters(), asked.parameters()):  # the request changes nothing in the update
        assert torch.equal(p.grad, q.grad)
    asked.zero_grad()
    asked.training_step((x, labels), 1).backward()  # the request was for one step only
    assert asked.last_step.gramian is None


@pytest.mark.parametrize("mode", ["parameters", "representation"])
@pytest.mark.parametrize("make", [MGDA, UPGrad])
def test_gradient_balancer_step_carries_its_gramian_and_weights(mode, make):
    module = make_module(tasks=make_tasks(metrics=False), balancer=make(), gradients=mode)
    x, labels = batch()
    _, parameter_gramian, representation_gramian = reference_gramians(module, x, labels)
    loss = module.training_step((x, labels), 0)
    if mode == "representation":  # the weights come with the backward
        assert module.last_step.weights is None
    loss.backward()
    step = module.last_step
    expected = parameter_gramian if mode == "parameters" else representation_gramian
    torch.testing.assert_close(step.gramian, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(step.weights, make().weights(expected), rtol=1e-4, atol=1e-6)


def test_direction_method_has_a_gramian_but_no_weights():
    module = make_module(tasks=make_tasks(metrics=False), balancer="graddrop")
    x, labels = batch()
    _, parameter_gramian, _ = reference_gramians(module, x, labels)
    module.training_step((x, labels), 0).backward()
    assert module.last_step.weights is None
    torch.testing.assert_close(module.last_step.gramian, parameter_gramian, rtol=1e-5, atol=1e-7)


def test_skipped_step_is_marked_and_has_no_weights():
    module = make_module(tasks=make_tasks(metrics=False), nonfinite_loss="skip")
    x, labels = batch()
    labels = dict(labels, reg=torch.full_like(labels["reg"], float("inf")))
    with pytest.warns(UserWarning, match="the step is skipped"):
        module.training_step((x, labels), 0).backward()
    step = module.last_step
    assert step.skipped and step.weights is None
    assert step.losses[1] == float("inf")


class Recorder(L.Callback):
    """Asks for the Gramian on even global steps; records what each hook sees of the step."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step % 2 == 0:
            pl_module.request_gramian()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before_step = pl_module.last_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = pl_module.last_step  # the same step as the optimizer step saw, weights included
        assert (step.global_step, step.batch_idx) == (self.before_step.global_step, self.before_step.batch_idx)
        assert torch.equal(step.losses, self.before_step.losses) and torch.equal(step.weights, self.before_step.weights)
        self.seen.append((step.global_step, step.batch_idx, step.gramian, step.weights))


@pytest.mark.parametrize("balancer,mode", [("static", "parameters"), ("uw", "representation"), ("upgrad", "representation")])
def test_callback_sees_every_step_and_gets_the_gramian_on_the_steps_it_asks(balancer, mode):
    module = make_module(tasks=make_tasks(metrics=False), balancer=balancer, gradients=mode)
    recorder = Recorder()
    trainer = quiet_trainer(max_epochs=1, callbacks=[recorder])
    trainer.fit(module, DataLoader(SharedInput(96), batch_size=16))
    assert [(g, b) for g, b, _, _ in recorder.seen] == [(i, i) for i in range(6)]
    for global_step, _, gramian, weights in recorder.seen:
        assert weights is not None and weights.shape == (2,)
        if balancer == "upgrad" or global_step % 2 == 0:
            assert gramian.shape == (2, 2) and torch.all(gramian.diagonal() > 0)
        else:
            assert gramian is None


@pytest.mark.parametrize("mode", ["parameters", "representation"])
def test_gramian_is_in_task_loss_units_under_a_loss_scale_and_accumulation(mode):
    """16-mixed (GradScaler on CPU, scale 2^10) and accumulate_grad_batches=2 give the Gramian of one batch."""
    data = SharedInput(32)
    first = (data.x[:16], {"cls": data.cls[:16], "reg": data.reg[:16]})
    reference = make_module(tasks=make_tasks(metrics=False), balancer=MGDA(), gradients=mode)
    module = copy.deepcopy(reference)
    _, parameter_gramian, representation_gramian = reference_gramians(reference, *first)
    expected = parameter_gramian if mode == "parameters" else representation_gramian

    class FirstStep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                self.gramian = pl_module.last_step.gramian

    first_step = FirstStep()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer = quiet_trainer(
        max_steps=1, accumulate_grad_batches=2, callbacks=[first_step],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    trainer.fit(module, DataLoader(SharedInput(32), batch_size=16))
    torch.testing.assert_close(first_step.gramian, expected, rtol=2e-2, atol=1e-4)


def test_requested_gramian_under_16_mixed_keeps_small_task_gradients():
    """The side backward of a loss-level step runs through fp16 ops: scaled like Lightning's backward, a task
    whose loss (and gradient) is tiny keeps its Gramian entries (unscaled they underflowed and flipped sign)."""
    tiny = lambda prediction, target: 1e-6 * torch.nn.functional.mse_loss(prediction, target)  # noqa: E731
    data = SharedInput(64)
    batch_data = (data.x, {"cls": data.cls, "reg": data.reg})

    def grab(precision_plugins):
        tasks = make_tasks(metrics=False)
        tasks[1] = type(tasks[1])("reg", tasks[1].head, tiny)
        module = make_module(tasks=tasks, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
        seen = {}

        class Grab(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                pl_module.request_gramian()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                seen["gramian"] = pl_module.last_step.gramian

        loader = DataLoader(torch.utils.data.TensorDataset(torch.arange(1)), batch_size=1, collate_fn=lambda _: batch_data)
        quiet_trainer(max_steps=1, callbacks=[Grab()], plugins=precision_plugins).fit(module, loader)
        return seen["gramian"]

    reference = grab([])
    scaled = grab([MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))])
    assert reference[1, 1] > 0 and reference[0, 1] != 0
    torch.testing.assert_close(scaled, reference, rtol=5e-2, atol=0)
