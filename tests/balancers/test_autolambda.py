"""Auto-Lambda (issue 16): the lookahead meta-gradient, primary tasks, the meta split, and the run under the Trainer."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import Subset, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from conftest import quiet_trainer, run_script
from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.architectures import MLP, RegressionHead
from lightning_mtl.balancers.autolambda import AutoLambda
from lightning_mtl.data import MultiTaskDataModule
from lightning_mtl.data.loader import EndlessLoader
from lightning_mtl.datasets import MultiDigits
from test_module import SharedInput, make_module, make_tasks

TESTS = Path(__file__).resolve().parents[1]
DDP_SCRIPT = TESTS / "_ddp_autolambda_fit.py"
NAMES = ["cls", "reg"]
EVERY = torch.ones(2, dtype=torch.bool)


# ---------------------------------------------------------------- a tiny model as plain functions of θ
def tiny_parameters(dtype=torch.float64):
    generator = torch.Generator().manual_seed(3)
    shapes = [(8, 6), (8,), (2, 8), (2,), (1, 8), (1,)]
    return [(torch.randn(shape, generator=generator, dtype=dtype) * 0.5).requires_grad_() for shape in shapes]


def tiny_batch(seed, n=16, dtype=torch.float64):
    data = SharedInput(n, seed=seed)
    return data.x.to(dtype), data.cls, data.reg.to(dtype)


def tiny_losses(theta, batch):
    """(CE of the class head, MSE of the regression head) at parameters ``theta``."""
    x, cls, reg = batch
    features = torch.tanh(F.linear(x, theta[0], theta[1]))
    return torch.stack([F.cross_entropy(F.linear(features, theta[2], theta[3]), cls),
                        F.mse_loss(F.linear(features, theta[4], theta[5]).flatten(), reg)])  # fmt: skip


def autolambda(names=NAMES, double=True, **kwargs):
    balancer = AutoLambda(**kwargs)
    balancer.setup(names)
    return balancer.double() if double else balancer  # the tiny model is in float64: the weights too, by default


def balancer_gradient(balancer, theta, train, meta, lr):
    result = balancer.meta_gradient(lambda batch: (tiny_losses(theta, batch), EVERY), theta, train, meta, lr)
    return result.gradient


def exact_meta_gradient(lambdas, theta, train, meta, lr, primary):
    """∂/∂λ Σ_primary L^meta(θ − α ∇_θ Σ λ_k L_k^train(θ)), by autograd through the virtual step."""
    lambdas = lambdas.detach().to(theta[0].dtype).requires_grad_()
    grads = torch.autograd.grad(lambdas @ tiny_losses(theta, train), theta, create_graph=True)
    virtual = [p - lr * g for p, g in zip(theta, grads)]
    (gradient,) = torch.autograd.grad(primary.to(lambdas.dtype) @ tiny_losses(virtual, meta), lambdas)
    return gradient


def loop_meta_gradient(lambdas, theta, train, meta, lr, primary, epsilon):
    """The paper's finite difference, written out task by task: −α (L_k(θ⁺) − L_k(θ⁻)) / 2ε, ε = epsilon / ‖v‖."""
    train_losses = tiny_losses(theta, train)
    total = sum(lambdas[k].item() * train_losses[k] for k in range(len(lambdas)))
    grads = torch.autograd.grad(total, theta)
    virtual = [(p - lr * g).detach().requires_grad_() for p, g in zip(theta, grads)]
    meta_losses = tiny_losses(virtual, meta)
    objective = sum(meta_losses[k] for k in range(len(lambdas)) if primary[k])
    v = torch.autograd.grad(objective, virtual)
    norm = torch.sqrt(sum((part**2).sum() for part in v))
    step = epsilon / norm
    out = []
    with torch.no_grad():
        for k in range(len(lambdas)):
            plus = tiny_losses([p + step * part for p, part in zip(theta, v)], train)[k]
            minus = tiny_losses([p - step * part for p, part in zip(theta, v)], train)[k]
            out.append(-lr * (plus - minus) / (2 * step))
    return torch.stack(out)


# ---------------------------------------------------------------- the meta-gradient
@pytest.mark.parametrize("primary", [None, ["cls"], ["reg"]])
def test_the_finite_difference_approaches_the_exact_lookahead_gradient(primary):
    theta, train, meta = tiny_parameters(), tiny_batch(0), tiny_batch(1)
    lr = 0.3
    balancer = autolambda(primary_tasks=primary, epsilon=1e-5, initial_weight=0.7)
    exact = exact_meta_gradient(balancer.lambdas, theta, train, meta, lr, balancer.primary)
    assert exact.abs().max() > 1e-3  # not a vacuous comparison
    torch.testing.assert_close(balancer_gradient(balancer, theta, train, meta, lr), exact, rtol=1e-6, atol=1e-9)
    # the paper's ε (0.01 / ‖v‖) is a close approximation too, and a smaller one is closer
    paper = balancer_gradient(autolambda(primary_tasks=primary, initial_weight=0.7), theta, train, meta, lr)
    torch.testing.assert_close(paper, exact, rtol=1e-3, atol=1e-6)
    coarse = balancer_gradient(autolambda(primary_tasks=primary, epsilon=1.0, initial_weight=0.7), theta, train, meta, lr)
    assert (coarse - exact).abs().max() > (paper - exact).abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_finite_difference_formula_is_reproduced_by_an_independent_loop(dtype):
    theta, train, meta = tiny_parameters(dtype), tiny_batch(0, dtype=dtype), tiny_batch(1, dtype=dtype)
    balancer = autolambda(initial_weight=0.4)
    balancer.lambdas.copy_(torch.tensor([0.4, 1.3]))
    expected = loop_meta_gradient(balancer.lambdas, theta, train, meta, 0.1, [True, True], 0.01)
    got = balancer_gradient(balancer, theta, train, meta, 0.1)
    torch.testing.assert_close(got.double(), expected.double(), rtol=0, atol=1e-6)
    assert expected.abs().max() > 1e-3


def test_the_meta_step_is_one_adam_step_along_the_meta_gradient_and_puts_the_parameters_back():
    theta, train, meta = tiny_parameters(), tiny_batch(0), tiny_batch(1)
    before = [p.detach().clone() for p in theta]
    rng = torch.get_rng_state()
    balancer = autolambda(lr=0.05)
    reference = balancer.lambdas.clone().requires_grad_()
    adam = torch.optim.Adam([reference], lr=0.05, foreach=False)
    for step in range(3):
        gradient = balancer.meta_step(lambda b: (tiny_losses(theta, b), EVERY), theta, train, meta, lr=0.2).gradient
        reference.grad = gradient.clone()
        adam.step()
        torch.testing.assert_close(balancer.lambdas, reference.detach(), rtol=1e-6, atol=1e-7, msg=f"step {step}")
    assert balancer.meta_batches == 3
    for p, p0 in zip(theta, before):
        assert torch.equal(p, p0) and p.grad is None
    assert torch.equal(torch.get_rng_state(), rng)


def test_dropout_draws_the_same_masks_in_every_forward_of_the_meta_step():
    """θ⁺ and θ⁻ see the same dropout mask (else their loss difference is the masks' noise, not the direction's)."""
    theta, train, meta = tiny_parameters(), tiny_batch(0), tiny_batch(1)

    def dropped(batch):
        x, cls, reg = batch
        return tiny_losses(theta, (F.dropout(x, 0.5), cls, reg)), EVERY

    balancer = autolambda(epsilon=1e-5)
    exact = exact_meta_gradient(balancer.lambdas, theta, train, meta, 0.3, EVERY)
    torch.manual_seed(0)
    noisy = balancer.meta_gradient(dropped, theta, train, meta, 0.3).gradient
    torch.manual_seed(0)
    again = balancer.meta_gradient(dropped, theta, train, meta, 0.3).gradient
    assert torch.equal(noisy, again)  # and the global RNG was left where it was
    assert noisy.abs().max() < 10 * exact.abs().max()  # a masks' difference / 2ε would be ~1e4 times larger


def test_a_task_absent_from_the_training_batch_keeps_its_weight_exactly():
    theta, train, meta = tiny_parameters(), tiny_batch(0), tiny_batch(1)
    only_cls = torch.tensor([True, False])

    def losses(batch):
        return tiny_losses(theta, batch) * only_cls, only_cls

    balancer = autolambda(lr=0.1)
    initial = balancer.lambdas.clone()
    for _ in range(3):
        balancer.meta_step(losses, theta, train, meta, lr=0.2)
    assert balancer.lambdas[1] == initial[1] and balancer.lambdas[0] != initial[0]


def test_no_primary_task_in_the_meta_batch_leaves_the_weights_alone():
    theta, train, meta = tiny_parameters(), tiny_batch(0), tiny_batch(1)
    balancer = autolambda(primary_tasks=["reg"])

    def losses(batch):
        present = EVERY if batch is train else torch.tensor([True, False])
        return tiny_losses(theta, batch) * present, present

    assert balancer.meta_step(losses, theta, train, meta, lr=0.2) is None
    assert torch.equal(balancer.lambdas, torch.full((2,), 0.1).double()) and balancer.meta_batches == 1


def test_forward_is_the_lambda_weighted_sum_of_the_present_tasks():
    balancer = autolambda()
    balancer.lambdas.copy_(torch.tensor([0.3, 2.0]))
    losses = torch.tensor([1.5, 4.0], requires_grad=True)
    total, weights = balancer(losses, EVERY)
    torch.testing.assert_close(total, torch.tensor(8.45))
    total, weights = balancer(losses, torch.tensor([False, True]))
    torch.testing.assert_close(weights, torch.tensor([0.0, 2.0]))
    assert total.item() == 8.0


# ---------------------------------------------------------------- primary tasks
def test_only_the_primary_tasks_meta_losses_drive_lambda():
    theta, train, meta = tiny_parameters(), tiny_batch(0), tiny_batch(1)
    x, cls, reg = meta
    other_reg = (x, cls, reg * -3.0 + 1.0)  # the non-primary task's meta labels changed
    other_cls = (x, 1 - cls, reg)  # the primary task's meta labels changed
    balancer = autolambda(primary_tasks=["cls"])
    base = balancer_gradient(balancer, theta, train, meta, 0.2)
    assert torch.equal(balancer_gradient(balancer, theta, train, other_reg, 0.2), base)
    assert not torch.allclose(balancer_gradient(balancer, theta, train, other_cls, 0.2), base)
    every = autolambda()  # with every task primary, the regression labels count
    assert not torch.allclose(balancer_gradient(every, theta, train, other_reg, 0.2), balancer_gradient(every, theta, train, meta, 0.2))


def test_bad_primary_task_names_are_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"names 'depth', which is not a task; the tasks are \['cls', 'reg'\]"):
        autolambda(primary_tasks=["cls", "depth"])
    with pytest.raises(ValueError, match="'depth', which is not a task"):
        make_module(balancer=AutoLambda(primary_tasks=["depth"]))
    with pytest.raises(ValueError, match="at least one task, each once"):
        AutoLambda(primary_tasks=[])
    with pytest.raises(ValueError, match="each once"):
        AutoLambda(primary_tasks=["cls", "cls"])
    with pytest.raises(ValueError, match="list of task names"):
        AutoLambda(primary_tasks="cls")


@pytest.mark.parametrize(
    "kwargs, name",
    [({"lr": 0.0}, "lr"), ({"epsilon": -1.0}, "epsilon"), ({"virtual_lr": 0.0}, "virtual_lr"),
     ({"initial_weight": float("nan")}, "initial_weight"), ({"update_every": 0}, "update_every")],
)  # fmt: skip
def test_bad_arguments_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AutoLambda(**kwargs)


# ---------------------------------------------------------------- state
def _stepped(balancer, steps, start=0):
    theta = tiny_parameters()
    outputs = []
    for step in range(start, start + steps):
        balancer.meta_step(lambda b: (tiny_losses(theta, b), EVERY), theta, tiny_batch(step), tiny_batch(100 + step), lr=0.3)
        outputs.append(balancer.lambdas.clone())
    return outputs


def test_state_dict_round_trip_resumes_exactly_and_reset_forgets():
    import io

    original = autolambda(lr=0.05, double=False)
    _stepped(original, 3)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = autolambda(lr=0.05, double=False)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.meta_batches == 3
    for a, b in zip(_stepped(resumed, 3, start=3), _stepped(original, 3, start=3)):
        assert torch.equal(a, b)
    original.reset()
    fresh = autolambda(lr=0.05, double=False)
    assert original.meta_batches == 0
    for a, b in zip(_stepped(original, 2), _stepped(fresh, 2)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- the meta split
def test_the_meta_stream_is_a_pure_function_of_its_position():
    data = MultiTaskDataModule(train=SharedInput(40), meta=SharedInput(40, seed=1), batch_size=16, seed=5)
    first = EndlessLoader(data.meta_dataloader())
    batches = [next(first)[0] for _ in range(7)]  # 3 batches an epoch: crosses two epoch ends
    assert first.position == 7
    assert not torch.equal(torch.cat(batches[:3]), torch.cat(batches[3:6]))  # another order each epoch
    again = EndlessLoader(data.meta_dataloader())
    again.seek(4)
    assert torch.equal(next(again)[0], batches[4]) and torch.equal(next(again)[0], batches[5])
    again.seek(1)
    assert torch.equal(next(again)[0], batches[1])


def test_the_training_dataset_as_meta_split_is_drawn_in_another_order():
    train = SharedInput(64)
    data = MultiTaskDataModule(train=train, meta=train, batch_size=16)
    meta_first = next(iter(data.meta_dataloader()))[0]
    train_first = next(iter(data.train_dataloader()))[0]
    assert not torch.equal(meta_first, train_first)


def test_a_per_task_meta_split_may_hold_the_primary_tasks_only_and_every_batch_holds_each():
    train = {"cls": SharedInput(32), "reg": SharedInput(48)}
    data = MultiTaskDataModule(train=train, meta={"reg": SharedInput(20, seed=2)}, batch_size=8)
    batches = list(data.meta_dataloader())
    assert len(batches) == 3 and all(list(batch) == ["reg"] for batch in batches)
    with pytest.raises(ValueError, match=r"`meta` has task\(s\) \['depth'\] that `train` lacks"):
        MultiTaskDataModule(train=train, meta={"depth": SharedInput(8)})


def test_without_meta_data_the_error_names_the_argument_to_set():
    module = make_module(balancer=AutoLambda())
    with pytest.raises(ValueError, match=r"MultiTaskDataModule\(meta=\.\.\.\)"):
        quiet_trainer(max_epochs=1).fit(module, datamodule=MultiTaskDataModule(train=SharedInput(32), batch_size=16))
    from torch.utils.data import DataLoader

    with pytest.raises(ValueError, match=r"no data module gives none: fit with datamodule=MultiTaskDataModule"):
        quiet_trainer(max_epochs=1).fit(make_module(balancer=AutoLambda()), DataLoader(SharedInput(32), batch_size=16))


def test_a_per_task_meta_split_without_any_primary_task_is_refused_before_any_step():
    """λ would never move (every meta batch gives v = 0): refused at set-up, naming both sets of tasks."""
    def per_task(n, seed=0):
        x = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))
        return {"cls": TensorDataset(x, (x[:, 0] > 0).long()), "reg": TensorDataset(x, x[:, 1] * 2.0)}

    module = make_module(tasks=make_tasks(metrics=False), balancer=AutoLambda(primary_tasks=["cls"]))
    data = MultiTaskDataModule(train=per_task(32), meta={"reg": per_task(16, seed=2)["reg"]}, batch_size=8)
    with pytest.raises(ValueError, match=r"holds the tasks \['reg'\] and none of the primary tasks \['cls'\]"):
        quiet_trainer(max_steps=2).fit(module, datamodule=data)
    assert module.balancer.meta_batches == 0
    module = make_module(tasks=make_tasks(metrics=False), balancer=AutoLambda(primary_tasks=["reg"]))
    quiet_trainer(max_steps=2).fit(module, datamodule=data)  # the primary task's meta data alone is enough
    assert module.balancer.meta_batches == 2 and not torch.equal(module.balancer.lambdas, torch.full((2,), 0.1))


# ---------------------------------------------------------------- under the Trainer
def meta_data(batch_size=16, train=64, meta=40, **kwargs):
    return MultiTaskDataModule(train=SharedInput(train), meta=SharedInput(meta, seed=1), batch_size=batch_size, **kwargs)


def sgd_module(balancer, **kwargs):
    return make_module(tasks=make_tasks(metrics=False), balancer=balancer,
                       optimizer=lambda p: torch.optim.SGD(p, lr=0.1), **kwargs)  # fmt: skip


def test_the_first_update_in_a_trainer_equals_the_meta_step_on_the_first_batches():
    """The module gives the balancer the step's training batch, the meta stream's first batch and α = the optimizer's
    lr; the meta step leaves the model as it was, so the training step is the one a fixed-λ run takes."""
    data = meta_data()
    module = sgd_module(AutoLambda(lr=0.01))
    reference = sgd_module(AutoLambda(lr=0.01))
    quiet_trainer(max_steps=1).fit(module, datamodule=data)
    train = next(iter(meta_data().train_dataloader()))
    meta = next(iter(meta_data().meta_dataloader()))
    forward = reference.task_forward

    def losses(batch):
        _, predictions = forward.run(forward.groups(batch))
        return forward.stack_losses({p[0]: forward.loss(*p)[0] for p in predictions})

    params = [p for p in reference.parameters() if p.requires_grad]
    reference.balancer.meta_step(losses, params, train, meta, lr=0.1)
    torch.testing.assert_close(module.balancer.lambdas, reference.balancer.lambdas, rtol=0, atol=1e-7)
    assert module.balancer.meta_batches == 1
    # the model's step used the new λ: the same update as one SGD step on Σ λ_k L_k
    total, _ = reference.balancer(*losses(train))
    total.backward()
    with torch.no_grad():
        for p in params:
            p -= 0.1 * p.grad
    for a, b in zip(module.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


class StateAtTrainingStep(Callback):
    """Records the model before the module's meta step (a callback's on_train_batch_start runs first)."""

    def __init__(self):
        self.before = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before.append(snapshot(module))


def snapshot(module):
    tensors = [t.detach().clone() for part in (module.backbone, module.heads) for t in [*part.parameters(), *part.buffers()]]
    return tensors, torch.get_rng_state()


class Recording(MultiTaskModule):
    def training_step(self, batch, batch_idx):
        self.at_step.append(snapshot(self))
        return super().training_step(batch, batch_idx)


def test_the_meta_step_changes_lambda_only_parameters_buffers_and_rng_are_as_before():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Tanh())
    module = Recording(backbone, make_tasks(metrics=False), balancer=AutoLambda(lr=0.01))
    module.at_step = []
    callback = StateAtTrainingStep()
    quiet_trainer(max_steps=3, callbacks=[callback]).fit(module, datamodule=meta_data())
    assert len(callback.before) == len(module.at_step) == 3
    for (before, rng_before), (at_step, rng_at_step) in zip(callback.before, module.at_step):
        assert all(torch.equal(a, b) for a, b in zip(before, at_step))
        assert torch.equal(rng_before, rng_at_step)
    assert not torch.equal(module.balancer.lambdas, torch.full((2,), 0.1))


@pytest.mark.parametrize("accumulate, update_every, expected", [(1, 1, 8), (2, 1, 4), (1, 3, 3), (2, 3, 2)])
def test_one_meta_step_per_optimizer_step_it_is_due(accumulate, update_every, expected):
    module = sgd_module(AutoLambda(update_every=update_every))
    trainer = quiet_trainer(max_epochs=2, accumulate_grad_batches=accumulate, gradient_clip_val=0.1)
    trainer.fit(module, datamodule=meta_data())
    assert trainer.global_step == 8 // accumulate
    assert module.balancer.meta_batches == expected
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_a_fitted_module_can_be_copied_and_the_copy_draws_on_from_the_same_position():
    """The meta stream's live iterator (a generator) is not copied: deepcopy after fit failed, and so did a second
    fit with StochasticWeightAveraging (which copies the module)."""
    module = sgd_module(AutoLambda(lr=0.01))
    quiet_trainer(max_steps=3).fit(module, datamodule=meta_data())
    copied = copy.deepcopy(module)
    stream, copied_stream = module._meta_steps.stream, copied._meta_steps.stream
    assert copied_stream.position == stream.position == 3
    for a, b in zip(next(stream), next(copied_stream)):
        assert torch.equal(a, b) if torch.is_tensor(a) else all(torch.equal(a[k], b[k]) for k in a)


def test_representation_mode_is_accepted_and_changes_nothing():
    """A loss-level method: the gradient mode is ignored, the lookahead is over every parameter."""
    runs = []
    for mode in ("parameters", "representation"):
        module = sgd_module(AutoLambda(lr=0.01), gradients=mode)
        quiet_trainer(max_steps=3).fit(module, datamodule=meta_data())
        runs.append(torch.cat([module.balancer.lambdas, *[p.flatten() for p in module.parameters()]]))
    assert torch.equal(*runs)


def test_resume_two_plus_two_epochs_equals_four_bit_for_bit(tmp_path):
    """λ, its Adam state, the meta stream's position (5 meta batches an epoch, 4 training steps: not aligned)."""
    def data():
        return meta_data(batch_size=16, train=64, meta=72, seed=3)

    straight = sgd_module(AutoLambda(lr=0.01))
    quiet_trainer(max_epochs=4).fit(straight, datamodule=data())
    first = sgd_module(AutoLambda(lr=0.01))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(max_epochs=2, enable_checkpointing=True, callbacks=[checkpoint]).fit(first, datamodule=data())
    resumed = sgd_module(AutoLambda(lr=0.01))
    quiet_trainer(max_epochs=4).fit(resumed, datamodule=data(), ckpt_path=tmp_path / "last.ckpt")

    assert straight.balancer.meta_batches == resumed.balancer.meta_batches == 16
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(straight.balancer.lambdas, resumed.balancer.lambdas)
    adam = [balancer.get_extra_state()["optimizer"]["state"][0] for balancer in (straight.balancer, resumed.balancer)]
    assert all(torch.equal(adam[0][key], adam[1][key]) for key in ("exp_avg", "exp_avg_sq", "step"))
    # not vacuous: a resume that restarted the meta stream would differ
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert state["state_dict"]["balancer._extra_state"]["meta_batches"] == 8
    state["state_dict"]["balancer._extra_state"]["meta_batches"] = 0
    torch.save(state, tmp_path / "restarted.ckpt")
    restarted = sgd_module(AutoLambda(lr=0.01))
    quiet_trainer(max_epochs=4).fit(restarted, datamodule=data(), ckpt_path=tmp_path / "restarted.ckpt")
    assert not torch.equal(restarted.balancer.lambdas, straight.balancer.lambdas)


def test_bf16_mixed_on_cpu_stays_finite():
    module = sgd_module(AutoLambda(lr=0.01))
    quiet_trainer(max_epochs=2, precision="bf16-mixed").fit(module, datamodule=meta_data())
    assert torch.isfinite(module.balancer.lambdas).all()
    assert not torch.equal(module.balancer.lambdas, torch.full((2,), 0.1))
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_under_bf16_mixed_the_finite_difference_forwards_run_without_autocast():
    """The two forwards at θ± (no graph) in full precision: in bf16 their losses round to the same value (measured:
    a meta-gradient of exactly 0 on the tiny module's first batches, −0.03 and −0.70 in float32)."""
    module = sgd_module(AutoLambda(lr=0.01))
    calls, forward = [], module.backbone.forward

    def recording(x):
        out = forward(x)
        calls.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), out.dtype))
        return out

    module.backbone.forward = recording
    quiet_trainer(max_steps=1, precision="bf16-mixed").fit(module, datamodule=meta_data())
    # meta step: two forwards with a graph, two without; then the training step
    assert [grad for grad, _, _ in calls] == [True, True, False, False, True]
    assert all(autocast and dtype == torch.bfloat16 for grad, autocast, dtype in calls if grad)
    assert all(not autocast and dtype == torch.float32 for grad, autocast, dtype in calls if not grad)


def test_under_bf16_true_lambda_stays_float32_and_learns_with_the_default_lr():
    """Adam's steps of 1e-4 are below half a bf16 ulp of λ = 0.1: a bf16 λ never moved (measured: 12 meta steps,
    λ exactly 0.1 in bf16; float32 runs moved it by 1e-3)."""
    module = sgd_module(AutoLambda())
    quiet_trainer(max_epochs=3, precision="bf16-true").fit(module, datamodule=meta_data())
    lambdas = module.balancer.lambdas
    assert module.balancer.meta_batches == 12 and lambdas.dtype == torch.float32
    assert (lambdas - 0.1).abs().min() > 5e-4
    assert next(module.backbone.parameters()).dtype == torch.bfloat16  # the model itself is cast


def test_under_16_mixed_with_a_grad_scaler_lambda_follows_the_float32_run():
    """The unweighted meta objective's scaled gradient overflowed in fp16 at a scale the real step kept (65536), so
    every meta-gradient was dropped and λ never moved; an overflow is now retried at a lower scale."""
    from lightning.pytorch.plugins import MixedPrecision

    runs = []
    for plugins in ([], [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]):
        module = sgd_module(AutoLambda(lr=0.01))
        quiet_trainer(max_steps=3, plugins=plugins).fit(module, datamodule=meta_data())
        runs.append(module.balancer.lambdas)
    assert (runs[0] - 0.1).abs().min() > 0.02
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_learns_multidigits_above_chance_in_one_epoch_with_a_meta_split():
    """One epoch (125 steps, a meta step each); chance accuracy is 0.10 ± 0.0067 on 2000 samples."""
    torch.manual_seed(0)
    tasks = [
        Task(name, nn.Linear(128, 10), nn.CrossEntropyLoss(), {"acc": MulticlassAccuracy(10, average="micro")})
        for name in ("left", "right")
    ] + [Task("sum", RegressionHead(128), nn.MSELoss())]
    model = MultiTaskModule(MLP(240, [256, 128]), tasks, balancer=AutoLambda(primary_tasks=["left", "right"]),
                            optimizer=lambda p: torch.optim.Adam(p, lr=5e-3))  # fmt: skip
    train = MultiDigits("train", size=4500, seed=0)
    data = MultiTaskDataModule(
        train=Subset(train, range(4000)), meta=Subset(train, range(4000, 4500)), val=MultiDigits("val", size=2000, seed=0),
        batch_size=32,
    )
    untrained = quiet_trainer().validate(copy.deepcopy(model), datamodule=data, verbose=False)[0]
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, datamodule=data)
    results = trainer.validate(model, datamodule=data, verbose=False)[0]
    assert results["val/left/acc"] > 0.125 and results["val/right/acc"] > 0.125, results
    assert results["val/loss"] < untrained["val/loss"] - 0.1, (untrained, results)
    assert model.balancer.meta_batches == 125 and not torch.equal(model.balancer.lambdas, torch.full((3,), 0.1))


# ---------------------------------------------------------------- DDP
@pytest.mark.slow
def test_two_ddp_processes_equal_one_process_on_the_global_batch(tmp_path):
    from _ddp_autolambda_fit import PER_RANK, STEPS, build, data

    returncode, output = run_script(DDP_SCRIPT, tmp_path, timeout=300)
    assert returncode == 0, output[-4000:]
    distributed = json.loads((tmp_path / "results.json").read_text())
    module = build()
    quiet_trainer(max_steps=STEPS).fit(module, datamodule=data(2 * PER_RANK))
    torch.testing.assert_close(torch.tensor(distributed["lambdas"]), module.balancer.lambdas, rtol=0, atol=1e-5)
    single = torch.cat([p.detach().flatten() for p in module.parameters()])
    torch.testing.assert_close(torch.tensor(distributed["parameters"]), single, rtol=0, atol=1e-5)
    assert (module.balancer.lambdas - 0.1).abs().min() > 1e-3  # λ moved: the comparison is not vacuous
    assert distributed["meta_batches"] == [STEPS, STEPS]  # on both ranks
    assert distributed["rank_lambdas_equal"]
