"""Gradient-level balancing inside MultiTaskModule: the update equals the method applied by hand."""

import copy
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn
from torch.utils.data import DataLoader

from conftest import quiet_trainer
from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.balancers import BALANCERS, DBMTL, MGDA, UPGrad, GradDrop
from test_module import SharedInput, make_module, make_tasks


def batch(n=16, seed=0):
    data = SharedInput(n, seed=seed)
    return data.x, {"cls": data.cls, "reg": data.reg}


def per_task_gradients(module, x, labels, inputs_of):
    """Loop reference: one backward per task; returns (losses, J rows per task over `inputs_of(z)`)."""
    z = module.backbone(x)
    losses = torch.stack(
        [
            nn.functional.cross_entropy(module.heads["cls"](z), labels["cls"]),
            nn.functional.mse_loss(module.heads["reg"](z), labels["reg"]),
        ]
    )
    return losses, loop_jacobian(losses, inputs_of(z)), z


def loop_jacobian(losses, inputs):
    """Reference Jacobian: one backward per loss, rows flattened over ``inputs`` (zeros where unused)."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(i)).flatten() for g, i in zip(grads, inputs)]))
    return torch.stack(rows)


def head_gradients(module, x, labels):
    z = module.backbone(x).detach()
    cls = nn.functional.cross_entropy(module.heads["cls"](z), labels["cls"])
    reg = nn.functional.mse_loss(module.heads["reg"](z), labels["reg"])
    return {
        "cls": torch.autograd.grad(cls, list(module.heads["cls"].parameters())),
        "reg": torch.autograd.grad(reg, list(module.heads["reg"].parameters())),
    }


def step_gradients(module, x, labels):
    module.zero_grad()
    module.training_step((x, labels), 0).backward()
    backbone = torch.cat([p.grad.flatten() for p in module.backbone.parameters()])
    heads = {name: [p.grad.clone() for p in module.heads[name].parameters()] for name in ("cls", "reg")}
    return backbone, heads


def assert_parameter_mode_step(module, balancer, rtol):
    """The backbone gets ``Jᵀw`` (``w`` from a fresh ``balancer()`` on the loop Jacobian), each head its plain gradient."""
    x, labels = batch()
    params = list(module.backbone.parameters())
    _, jacobian, _ = per_task_gradients(module, x, labels, lambda z: params)
    assert (jacobian.abs().sum(dim=1) > 0).all()  # every task reaches the backbone: the comparison is not vacuous
    expected = balancer().weights(jacobian @ jacobian.T) @ jacobian
    backbone, heads = step_gradients(module, x, labels)
    torch.testing.assert_close(backbone, expected, rtol=rtol, atol=1e-6)
    for name, grads in head_gradients(module, x, labels).items():
        for got, want in zip(heads[name], grads):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("balancer", [MGDA, UPGrad])
def test_parameter_mode_backbone_gets_jacobian_transpose_w_and_heads_their_plain_gradient(balancer):
    module = make_module(tasks=make_tasks(metrics=False), balancer=balancer(), gradients="parameters")
    assert_parameter_mode_step(module, balancer, rtol=1e-5)


class LastHidden(nn.Module):
    """An RNN over the 6 input features read as a sequence of 6 steps of 1; its last hidden state (8)."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x.unsqueeze(-1))[0][:, -1]


BACKBONES = {  # modules the batched backward must handle exactly (or hand to its per-task fallback)
    "batchnorm": lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(inplace=True)),
    "lstm": lambda: LastHidden(nn.LSTM(1, 8, batch_first=True)),
    "gru-2-layers": lambda: LastHidden(nn.GRU(1, 8, num_layers=2, batch_first=True)),
    "conv-batchnorm": lambda: nn.Sequential(
        nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 8)
    ),
}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_parameter_mode_is_exact_for_batchnorm_and_recurrent_backbones(backbone):
    """Batch statistics, recurrences and in-place activations: the per-task Jacobian equals one backward per task."""
    torch.manual_seed(0)
    module = MultiTaskModule(BACKBONES[backbone](), make_tasks(metrics=False), balancer=UPGrad(), gradients="parameters")
    assert_parameter_mode_step(module, UPGrad, rtol=1e-4)


def test_representation_mode_weights_come_from_the_output_gramian():
    module = make_module(tasks=make_tasks(metrics=False), balancer=MGDA(), gradients="representation")
    x, labels = batch()
    losses, jacobian_z, _ = per_task_gradients(module, x, labels, lambda z: [z])
    weights = MGDA().weights(jacobian_z @ jacobian_z.T)
    expected = torch.cat(
        [g.flatten() for g in torch.autograd.grad(weights @ losses, list(module.backbone.parameters()))]
    )
    backbone, _ = step_gradients(module, x, labels)
    torch.testing.assert_close(backbone, expected, rtol=1e-5, atol=1e-6)


def test_representation_mode_reuses_its_cotangent_stack_and_stays_exact_across_steps_and_batch_sizes():
    """The K × B × d stack is written into memory kept across steps (a fresh one each step was up to 8x slower at
    K = 40): every step still equals the loop reference, also when the batch size changes (the buffer is replaced),
    and a copy of the module does not carry the scratch memory. Three tasks: two are kept as rows, unstacked."""
    tasks = [*make_tasks(metrics=False), Task("sum", nn.Sequential(nn.Linear(8, 1), nn.Flatten(0)), nn.MSELoss())]
    module = make_module(tasks=tasks, balancer=MGDA(), gradients="representation")
    buffers = module.task_forward.cotangent_buffers
    for step, n in enumerate((16, 16, 9, 16)):
        x, labels = batch(n, seed=step)
        labels["sum"] = x[:, 2] + x[:, 3]
        z = module.backbone(x)
        losses = torch.stack([module.tasks[name].loss(module.heads[name](z), labels[name]) for name in module.task_names])
        jacobian_z = loop_jacobian(losses, [z])
        weights = MGDA().weights(jacobian_z @ jacobian_z.T)
        expected = torch.cat([g.flatten() for g in torch.autograd.grad(weights @ losses, list(module.backbone.parameters()))])
        module.zero_grad()
        module.training_step((x, labels), 0).backward()
        backbone = torch.cat([p.grad.flatten() for p in module.backbone.parameters()])
        torch.testing.assert_close(backbone, expected, rtol=1e-5, atol=1e-6)
        assert [tuple(b.shape) for b in buffers.values()] == [(3, n, 8)]
    kept = buffers[0].data_ptr()
    module.training_step((x, labels), 0).backward()
    assert buffers[0].data_ptr() == kept  # the same memory, filled again
    assert copy.deepcopy(module).task_forward.cotangent_buffers == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_representation_mode_two_tasks_are_balanced_from_their_rows_exactly(dtype):
    """K = 2 in one process: the Gramian is three dot products read as floats and the direction two operations
    on the rows (no stack, no buffer); the update still equals the loop reference, in float32 and float64."""
    module = make_module(tasks=make_tasks(metrics=False), balancer=UPGrad(), gradients="representation").to(dtype)
    for step in range(3):
        x, labels = batch(16, seed=step)
        x, labels["reg"] = x.to(dtype), labels["reg"].to(dtype)
        losses, jacobian_z, _ = per_task_gradients(module, x, labels, lambda z: [z])
        gramian = jacobian_z @ jacobian_z.T
        weights = UPGrad().weights(gramian)
        expected = torch.cat([g.flatten() for g in torch.autograd.grad(weights @ losses, list(module.backbone.parameters()))])
        backbone, _ = step_gradients(module, x, labels)
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
        torch.testing.assert_close(backbone, expected, **tolerance)
        record = module.last_step
        assert record.gramian.dtype == dtype
        torch.testing.assert_close(record.gramian, gramian, **tolerance)
        torch.testing.assert_close(record.weights.double(), weights.double(), rtol=1e-5, atol=1e-7)
    assert module.task_forward.cotangent_buffers == {}  # the rows were not stacked


@pytest.mark.parametrize("make", [lambda: DBMTL(), lambda: GradDrop(seed=3)])
def test_non_weighting_direction_reaches_the_backbone_exactly(make):
    module = make_module(tasks=make_tasks(metrics=False), balancer=make(), gradients="parameters")
    reference = make()
    x, labels = batch()
    params = list(module.backbone.parameters())
    losses, jacobian, _ = per_task_gradients(module, x, labels, lambda z: params)
    if reference.log_losses:  # DB-MTL balances the gradients of log(L_k + eps) = ∇L_k / (L_k + eps)
        jacobian = jacobian / (losses.detach() + reference.log_eps).unsqueeze(1)
    expected = reference(jacobian)
    backbone, heads = step_gradients(module, x, labels)
    torch.testing.assert_close(backbone, expected, rtol=1e-5, atol=1e-6)
    for name, grads in head_gradients(module, x, labels).items():
        for got, want in zip(heads[name], grads):
            torch.testing.assert_close(got, want)


def test_weights_are_logged_per_task(recording_logger):
    module = make_module(balancer="mgda")
    trainer = quiet_trainer(logger=recording_logger, log_every_n_steps=1)
    trainer.fit(module, DataLoader(SharedInput(64), batch_size=16))
    assert {"train/cls/weight", "train/reg/weight"} <= recording_logger.keys
    for _, metrics in recording_logger.history:
        if "train/cls/weight" in metrics:
            assert metrics["train/cls/weight"] + metrics["train/reg/weight"] == pytest.approx(1.0, abs=1e-5)


def test_representation_mode_logs_the_weights_found_in_the_backward(recording_logger):
    module = make_module(balancer="mgda", gradients="representation")
    trainer = quiet_trainer(logger=recording_logger, log_every_n_steps=1)
    trainer.fit(module, DataLoader(SharedInput(64), batch_size=16))
    logged = [metrics for _, metrics in recording_logger.history if "train/cls/weight" in metrics]
    assert len(logged) == trainer.global_step == 4
    for metrics in logged:
        assert metrics["train/cls/weight"] + metrics["train/reg/weight"] == pytest.approx(1.0, abs=1e-5)
        assert 0 < metrics["train/loss"] < metrics["train/cls/loss"] + metrics["train/reg/loss"]  # Σ w_k L_k


class InfiniteGradient(torch.autograd.Function):
    """Identity whose backward is infinite: a finite loss with a non-finite task gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def infinite_gradient_mse(prediction, target):
    return nn.functional.mse_loss(InfiniteGradient.apply(prediction), target)


def tasks_with_an_infinite_gradient():
    tasks = make_tasks(metrics=False)
    return [task if task.name != "reg" else type(task)("reg", task.head, infinite_gradient_mse) for task in tasks]


@pytest.mark.parametrize("mode", ["parameters", "representation"])
def test_nonfinite_task_gradient_of_a_finite_loss_raises_naming_the_task(mode):
    module = make_module(tasks=tasks_with_an_infinite_gradient(), balancer="mgda", gradients=mode)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(FloatingPointError, match=r"non-finite task gradient for task\(s\) \['reg'\] at global step 0 \(batch 0\)"):
        quiet_trainer(max_epochs=1).fit(module, DataLoader(SharedInput(32), batch_size=16))
    for p, p0 in zip(module.parameters(), before):
        torch.testing.assert_close(p.detach(), p0, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["parameters", "representation"])
def test_nonfinite_task_gradient_skip_mode_skips_every_such_step(mode):
    module = make_module(tasks=tasks_with_an_infinite_gradient(), balancer="mgda", gradients=mode, nonfinite_loss="skip")
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.warns(UserWarning, match=r"non-finite task gradient for task\(s\) \['reg'\].*skipped"):
        quiet_trainer(max_epochs=1).fit(module, DataLoader(SharedInput(32), batch_size=16))
    for p, p0 in zip(module.parameters(), before):  # heads included: no gradient of a skipped step is applied
        torch.testing.assert_close(p.detach(), p0, rtol=0, atol=0)


def test_representation_mode_needs_one_shared_tensor():
    class DictBackbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(6, 8)

        def forward(self, x):
            z = self.linear(x)
            return {"cls": z, "reg": z * 2}

    module = MultiTaskModule(DictBackbone(), make_tasks(metrics=False), balancer="mgda", gradients="representation")
    with pytest.raises(ValueError, match="gradients='representation' needs a backbone that returns one shared tensor"):
        module.training_step(batch(), 0)


def test_unknown_gradient_mode():
    with pytest.raises(ValueError, match=r"gradients must be one of \['parameters', 'representation'\]"):
        make_module(gradients="params")


@pytest.mark.parametrize("strategy", [FSDPStrategy, DeepSpeedStrategy])
def test_sharded_strategies_with_parameter_gradients_are_refused(strategy):
    try:
        instance = strategy()
    except Exception as error:  # DeepSpeed is not installed: its strategy cannot even be built
        pytest.skip(f"{strategy.__name__} cannot be built here: {error}")
    module = make_module(balancer="upgrad", gradients="parameters")
    module._trainer = SimpleNamespace(strategy=instance)
    with pytest.raises(ValueError, match="Use gradients='representation'"):
        module._check_gradient_strategy()
    make_module(balancer="upgrad", gradients="representation")._check_gradient_strategy  # allowed
    loss_level = make_module(balancer="uw")
    loss_level._trainer = SimpleNamespace(strategy=instance)
    loss_level._check_gradient_strategy()  # loss-level methods need no per-task gradient


def sgd_module(balancer, **kwargs):
    return make_module(
        tasks=make_tasks(metrics=False), balancer=balancer, optimizer=lambda p: torch.optim.SGD(p, lr=1.0), **kwargs
    )


def balanced_gradient(module, x, labels):
    module.zero_grad()
    module.training_step((x, labels), 0).backward()
    return [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("mode", ["parameters", "representation"])
def test_accumulation_balances_each_micro_batch(mode):
    """With accumulate_grad_batches=2 the update is the mean of the two micro-batches' balanced gradients."""
    data = SharedInput(32)
    module = sgd_module("mgda", gradients=mode)
    before = [p.detach().clone() for p in module.parameters()]
    grads = [balanced_gradient(module, data.x[i : i + 16], {"cls": data.cls[i : i + 16], "reg": data.reg[i : i + 16]}) for i in (0, 16)]
    quiet_trainer(max_steps=1, accumulate_grad_batches=2).fit(module, DataLoader(data, batch_size=16))
    for p, p0, g1, g2 in zip(module.parameters(), before, *grads):
        torch.testing.assert_close(p.detach(), p0 - (g1 + g2) / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["parameters", "representation"])
def test_gradient_clipping_clips_the_balanced_gradient(mode):
    data = SharedInput(16)
    module = sgd_module("upgrad", gradients=mode)
    before = [p.detach().clone() for p in module.parameters()]
    grads = balanced_gradient(module, data.x, {"cls": data.cls, "reg": data.reg})
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert norm > 0.05
    quiet_trainer(max_steps=1, gradient_clip_val=0.05).fit(module, DataLoader(data, batch_size=16))
    for p, p0, g in zip(module.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - g * (0.05 / (norm + 1e-6)), rtol=1e-4, atol=1e-6)


def test_stateful_gradient_methods_refuse_representation_mode():
    with pytest.raises(ValueError, match="balancer DBMTL keeps gradient state across steps.*gradients='parameters'"):
        make_module(balancer="dbmtl", gradients="representation")


def test_parameter_jacobian_falls_back_to_one_backward_per_task(monkeypatch):
    """When the batched backward is unavailable (an op without a batching rule), K backward passes."""
    from lightning_mtl import gradients

    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    unused = nn.Parameter(torch.ones(2))
    z = torch.tanh(linear(torch.randn(5, 4)))
    cotangents = [torch.randn(2, 5, 3)]
    params = [*linear.parameters(), unused]
    batched = gradients.parameter_jacobian([z], cotangents, params)

    real_grad = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("Batching rule not implemented")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    looped = gradients.parameter_jacobian([z], cotangents, params)
    for i, p in enumerate(params):
        expected = torch.stack(
            [
                real_grad(z, p, cotangents[0][k], retain_graph=True)[0] if p is not unused else torch.zeros(2)
                for k in range(2)
            ]
        )
        torch.testing.assert_close(looped[i], expected)
        torch.testing.assert_close(batched[i], expected)


def test_output_cotangents_are_each_tasks_gradient_of_the_output_it_read():
    """Shared output read by tasks 0 and 2 (task 1 has no head call), and a second output for task 3."""
    from lightning_mtl.gradients import output_cotangents

    torch.manual_seed(0)
    z = torch.tanh(nn.Linear(4, 6)(torch.randn(5, 4)))
    u = torch.sigmoid(nn.Linear(4, 6)(torch.randn(3, 4)))
    leaves = {k: t.detach().requires_grad_() for k, t in ((0, z), (2, z), (3, u))}
    heads = [nn.Linear(6, 2), None, nn.Linear(6, 1), nn.Linear(6, 3)]
    losses = [heads[0](leaves[0]).pow(2).mean(), heads[2](leaves[2]).sum(), heads[3](leaves[3]).exp().mean()]
    captured = [(z, leaves[0]), None, (z, leaves[2]), (u, leaves[3])]
    head_params = [p for head in heads if head is not None for p in head.parameters()]
    unreached = nn.Parameter(torch.ones(2))
    expected_leaves = [torch.autograd.grad(loss, leaves[k], retain_graph=True)[0] for loss, k in zip(losses, (0, 2, 3))]
    expected_params = torch.autograd.grad(sum(losses), head_params, retain_graph=True)
    outputs, cotangents, reached = output_cotangents(sum(losses), captured, [*head_params, unreached])
    assert outputs[0] is z and outputs[1] is u
    assert cotangents[0].shape == (4, 5, 6) and cotangents[1].shape == (4, 3, 6)
    torch.testing.assert_close(cotangents[0][0], expected_leaves[0])
    torch.testing.assert_close(cotangents[0][2], expected_leaves[1])
    torch.testing.assert_close(cotangents[1][3], expected_leaves[2])
    for i, k in ((0, 1), (0, 3), (1, 0), (1, 1), (1, 2)):
        assert not cotangents[i][k].any()
    assert [p for p, _ in reached] == head_params  # the parameter the heads do not use is left out
    for (_, got), want in zip(reached, expected_params):
        torch.testing.assert_close(got, want)


def test_task_jacobian_blocks_give_the_gramian_and_direction_of_the_whole_matrix():
    from lightning_mtl.gradients import TaskJacobian, surrogate

    torch.manual_seed(0)
    inputs = [torch.randn(3), torch.randn(200, 100, requires_grad=True), torch.randn(4, 2), torch.randn(7)]
    rows = [torch.randn(3, *x.shape) for x in inputs]
    jacobian = TaskJacobian(inputs, rows)
    assert len(jacobian.blocks) == 3  # [small], [large], [small, small]
    whole = torch.cat([r.reshape(3, -1) for r in rows], dim=1)
    torch.testing.assert_close(jacobian.flat(), whole)
    torch.testing.assert_close(jacobian.gramian(), whole @ whole.T)
    weights = torch.tensor([0.2, -1.0, 3.0])
    for piece, want in zip(jacobian.combine(weights), jacobian.split(weights @ whole)):
        torch.testing.assert_close(piece, want)
    params = [torch.randn(x.shape, requires_grad=True) for x in inputs]
    value = surrogate(jacobian.combine(weights), params)
    assert value.item() == 0.0
    value.backward()
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in params]), weights @ whole)


@pytest.mark.parametrize("gradients", ["parameters", "representation"])
def test_bf16_mixed_logs_the_weighted_loss_in_float32(gradients, recording_logger):
    """Review: in parameter mode ``train/loss = w · L`` was formed under the step's CPU autocast, a bfloat16 matmul
    (4.8125 logged for 4.8134); it is the float32 sum in both modes."""
    module = make_module(tasks=make_tasks(metrics=False), balancer=UPGrad(), gradients=gradients)
    data = SharedInput(32)
    loader = DataLoader(list(zip(data.x, data.cls, data.reg)), batch_size=16, collate_fn=lambda items: (
        torch.stack([x for x, _, _ in items]), {"cls": torch.stack([c for _, c, _ in items]), "reg": torch.stack([r for _, _, r in items])}
    ))
    quiet_trainer(max_steps=2, logger=recording_logger, log_every_n_steps=1, precision="bf16-mixed").fit(module, loader)
    record = module.last_step
    expected = (record.weights.double() @ record.losses.double()).item()
    logged = [metrics["train/loss"] for _, metrics in recording_logger.history if "train/loss" in metrics]
    assert len(logged) == 2 and logged[-1] == pytest.approx(expected, rel=1e-6)


class _Scaled(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, prediction, target):
        return self.factor * ((prediction - target) ** 2).mean()


class _OwnMGDA(MGDA):
    """A user's MGDA variant (its own ``_weights``): no two-task closed form, the Gramian tensor is read."""

    def _weights(self, gramian, present):
        return super()._weights(gramian, present)


@pytest.mark.parametrize("make", [MGDA, _OwnMGDA])
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_two_task_rows_under_accumulation_see_a_gramian_that_overflows_the_rows_dtype(make, policy):
    """Review: with ``accumulate_grad_batches`` the Gramian is divided by ``(1/4)**2``; gradients of norm² ~1e38 then
    overflow float32 there. The two-task rows path divided the entries as Python floats and missed it (no error, NaN
    parameters or a step on an inf Gramian); like the stacked path it must raise the named error, or skip."""
    torch.manual_seed(0)
    data = SharedInput(64)
    tasks = [
        Task("cls", nn.Sequential(nn.Linear(8, 1), nn.Flatten(0)), _Scaled(9e19)),
        Task("reg", nn.Sequential(nn.Linear(8, 1), nn.Flatten(0)), _Scaled(1e20)),
    ]
    module = MultiTaskModule(
        nn.Sequential(nn.Linear(6, 8), nn.Tanh()), tasks, balancer=make(), gradients="representation",
        nonfinite_loss=policy, optimizer=lambda params: torch.optim.SGD(params, lr=1e-40),
    )
    loader = DataLoader(list(zip(data.x, data.reg)), batch_size=16, collate_fn=lambda items: (
        torch.stack([x for x, _ in items]), {"cls": torch.stack([y for _, y in items]), "reg": torch.stack([y for _, y in items])}
    ))
    before = [p.detach().clone() for p in module.backbone.parameters()]
    trainer = quiet_trainer(max_steps=1, accumulate_grad_batches=4)
    if policy == "raise":
        with pytest.raises(FloatingPointError, match=r"non-finite task gradient for task\(s\) \['cls', 'reg'\]"):
            trainer.fit(module, loader)
        return
    with pytest.warns(UserWarning, match="non-finite task gradient"):
        trainer.fit(module, loader)
    assert module.last_step.skipped
    for p, old in zip(module.backbone.parameters(), before):
        assert torch.equal(p, old)


@pytest.mark.parametrize("gradients", ["parameters", "representation"])
def test_float64_model_logs_its_weighted_loss(gradients, recording_logger):
    """Review: a float64 model's Gramian weights are float64 and its recorded losses float32; logging
    ``train/loss = w · L`` raised a dtype error in the Trainer."""
    module = make_module(tasks=make_tasks(metrics=False), balancer=UPGrad(), gradients=gradients).double()
    data = SharedInput(32)
    loader = DataLoader(list(zip(data.x.double(), data.cls, data.reg.double())), batch_size=16, collate_fn=lambda items: (
        torch.stack([x for x, _, _ in items]), {"cls": torch.stack([c for _, c, _ in items]), "reg": torch.stack([r for _, _, r in items])}
    ))
    quiet_trainer(max_steps=2, logger=recording_logger, log_every_n_steps=1).fit(module, loader)
    assert module.last_step.weights.dtype == torch.float64
    logged = [metrics["train/loss"] for _, metrics in recording_logger.history if "train/loss" in metrics]
    record = module.last_step
    assert len(logged) == 2 and logged[-1] == pytest.approx((record.weights.float() @ record.losses).item(), rel=1e-6)


def test_task_jacobian_keeps_two_tasks_rows_apart_only_where_that_is_exact_and_cheap():
    """Two CPU float32/64 rows of one output up to 4 * PRODUCT_CHUNK wide, outside create_graph: kept as rows, and
    its Gramian (entries as floats), flat matrix, direction and log-loss scaling equal the stacked Jacobian's.
    Three tasks, two outputs, half precision, mixed dtypes, a wider output or create_graph: stacked."""
    from lightning_mtl.gradients import PRODUCT_CHUNK, TaskJacobian

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        first, second = torch.randn(16, 8, dtype=dtype), torch.randn(16, 8, dtype=dtype) + 0.5
        with torch.no_grad():
            pair = TaskJacobian.of_task_cotangents([(first, second)])
        stacked = TaskJacobian([first], [torch.stack([first, second])])
        assert pair.pair is not None and pair.blocks == [] and pair.inputs[0] is first
        whole = torch.stack([first.flatten(), second.flatten()])
        exact = (whole.double() @ whole.double().T).flatten().tolist()
        assert pair.pair_entries() == pytest.approx(exact, rel=1e-6 if dtype == torch.float32 else 1e-14)
        assert pair.pair_entries()[1] == pair.pair_entries()[2]  # symmetric: one dot product
        assert stacked.pair_entries() is None
        torch.testing.assert_close(pair.gramian(), stacked.gramian())
        torch.testing.assert_close(pair.flat(), stacked.flat())
        weights = torch.tensor([0.25, -1.5])
        (got,), (want,) = pair.combine(weights), stacked.combine(weights)
        assert got.shape == first.shape and got.dtype == dtype
        torch.testing.assert_close(got, want)
        factors, before = torch.tensor([2.0, 0.0]), first.clone()
        pair.scale_rows(factors)
        stacked.scale_rows(factors)
        torch.testing.assert_close(pair.flat(), stacked.flat())
        torch.testing.assert_close(pair.flat()[0], 2 * before.flatten())
        assert torch.equal(first, before)  # the stored rows are scaled, not the cotangent autograd handed over

    wide = torch.randn(4 * PRODUCT_CHUNK + 1)
    narrow = torch.randn(4, 8)
    with torch.no_grad():
        assert TaskJacobian.of_task_cotangents([(narrow, narrow, narrow)]).pair is None  # three tasks
        assert TaskJacobian.of_task_cotangents([(narrow, narrow), (narrow, narrow)]).pair is None  # two outputs
        assert TaskJacobian.of_task_cotangents([(wide, wide)]).pair is None  # one mm is no worse past 4 chunks
        assert TaskJacobian.of_task_cotangents([(narrow.bfloat16(), narrow.bfloat16())]).pair is None
        assert TaskJacobian.of_task_cotangents([(narrow, narrow.double())]).pair is None
    with torch.enable_grad():  # create_graph: the entries would be read off the graph
        assert TaskJacobian.of_task_cotangents([(narrow, narrow)]).pair is None
    buffers = {}
    with torch.no_grad():
        stacked = TaskJacobian.of_task_cotangents([(narrow, narrow + 1, narrow - 1)], buffers)
    assert buffers[0].shape == (3, 4, 8) and stacked.blocks[0].data_ptr() == buffers[0].data_ptr()


def test_surrogate_hands_its_adoptable_directions_over_without_a_copy_and_scales_them_under_a_loss_factor():
    """Unscaled (the usual step), the parameters' gradients are the adoptable directions themselves (no copy pass)
    and copies of the others; scaled (accumulation, a loss scale) they are the scaled directions, accumulate across
    micro-batches, and leave the directions untouched; a second backward through one surrogate raises."""
    from lightning_mtl.gradients import surrogate

    params = [torch.zeros(3, 4, requires_grad=True), torch.zeros(5, requires_grad=True)]
    flat = torch.arange(17.0)
    surrogate(list(torch.split(flat, [12, 5])), params, adopt=1).backward()
    assert params[0].grad.data_ptr() == flat.data_ptr()  # adopted
    assert params[1].grad.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()  # copied
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in params]), flat)
    for p in params:
        p.grad = None
    first, second = torch.arange(17.0), torch.full((17,), 2.0)
    for direction in (first, second):  # two micro-batches, each loss divided by 2 (accumulate_grad_batches=2)
        (surrogate(list(torch.split(direction, [12, 5])), params, adopt=2) * 0.5).backward()
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in params]), (first + second) / 2)
    torch.testing.assert_close(first, torch.arange(17.0))
    value = surrogate(list(torch.split(flat, [12, 5])), params)
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="back-propagated twice"):
        value.backward()


class _OffsetLoss(nn.Module):
    """A loss plus a learned scalar: autograd hands every task's scalar its gradient as a view of one element."""

    def __init__(self, base):
        super().__init__()
        self.base, self.offset = base, nn.Parameter(torch.zeros(()))

    def forward(self, prediction, target):
        return self.base(prediction, target) + self.offset


@pytest.mark.parametrize("balancer", ["mgda", "graddrop"])
def test_parameter_mode_heads_gradients_that_autograd_aliases_are_clipped_and_accumulated_once(balancer):
    """Review 2026-12-02: gradients adopted without a copy made two loss modules' ``.grad`` one element, so
    ``clip_grad_norm_`` scaled it twice (norm 0.09 instead of 0.1) and two backwards gave 3 instead of 2."""
    torch.manual_seed(0)
    tasks = [
        Task("cls", nn.Linear(8, 2), _OffsetLoss(nn.CrossEntropyLoss())),
        Task("reg", nn.Sequential(nn.Linear(8, 1), nn.Flatten(0)), _OffsetLoss(nn.MSELoss())),
    ]
    module = MultiTaskModule(nn.Sequential(nn.Linear(6, 8), nn.Tanh()), tasks, balancer=balancer, gradients="parameters")
    data = SharedInput(16)
    step = (data.x, {"cls": data.cls, "reg": data.reg})
    module.training_step(step, 0).backward()
    offsets = [module.losses[name].offset for name in ("cls", "reg")]
    assert offsets[0].grad.data_ptr() != offsets[1].grad.data_ptr()
    params = [p for p in module.parameters() if p.grad is not None]
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)).item()
    torch.nn.utils.clip_grad_norm_(params, 0.1)
    assert torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)).item() == pytest.approx(0.1, rel=1e-5)
    assert [o.grad.item() for o in offsets] == pytest.approx([0.1 / norm] * 2, rel=1e-5)
    if balancer == "graddrop":  # its direction (new, fresh_direction) is adopted: the backbone's gradients share it
        storages = {p.grad.untyped_storage().data_ptr() for p in module.backbone.parameters()}
        assert len(storages) == 1
    module.zero_grad()
    module.training_step(step, 0).backward()
    module.training_step(step, 0).backward()
    assert [o.grad.item() for o in offsets] == [2.0, 2.0]


# (a balancer that needs meta batches, AutoLambda, is run with clipping and accumulation in test_autolambda.py)
@pytest.mark.parametrize("name", sorted(name for name, cls in BALANCERS.items() if not cls.needs_meta_batches))
def test_every_balancer_works_with_clipping_and_accumulation(name):
    module = make_module(balancer=name)
    trainer = quiet_trainer(max_epochs=2, gradient_clip_val=0.1, accumulate_grad_batches=2)
    trainer.fit(module, DataLoader(SharedInput(128), batch_size=16))
    assert trainer.global_step == 8  # 16 micro-batches, 2 per optimizer step
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_frozen_backbone_leaves_nothing_to_balance_and_heads_train_plainly():
    module = make_module(tasks=make_tasks(metrics=False), balancer="mgda", gradients="parameters")
    module.backbone.requires_grad_(False)  # what SequentialTransfer(mode="freeze") does
    x, labels = batch()
    loss = module.training_step((x, labels), 0)
    loss.backward()
    assert all(p.grad is None for p in module.backbone.parameters())
    for name, grads in head_gradients(module, x, labels).items():
        for got, want in zip(module.heads[name].parameters(), grads):
            torch.testing.assert_close(got.grad, want)


def test_parameter_mode_with_one_backbone_output_per_task_matches_the_loop_reference():
    """MMoE returns {task: tensor}: each task's cotangent goes back through its own output."""
    from lightning_mtl.architectures import MMoE

    torch.manual_seed(0)
    backbone = MMoE(6, expert_features=8, num_experts=3, tasks=["cls", "reg"])
    module = MultiTaskModule(backbone, make_tasks(metrics=False), balancer=UPGrad(), gradients="parameters")
    x, labels = batch()
    features = module.backbone(x)
    losses = torch.stack(
        [
            nn.functional.cross_entropy(module.heads["cls"](features["cls"]), labels["cls"]),
            nn.functional.mse_loss(module.heads["reg"](features["reg"]), labels["reg"]),
        ]
    )
    jacobian = loop_jacobian(losses, list(module.backbone.parameters()))
    expected = UPGrad().weights(jacobian @ jacobian.T) @ jacobian
    backbone_grad, _ = step_gradients(module, x, labels)
    torch.testing.assert_close(backbone_grad, expected, rtol=1e-5, atol=1e-6)


def test_parameter_mode_with_per_task_inputs_matches_the_loop_reference():
    """Per-task batches of one shape share one backbone call; each head reads its own slice of it."""
    module = make_module(tasks=make_tasks(metrics=False), balancer=MGDA(), gradients="parameters")
    first, second = SharedInput(12, seed=1), SharedInput(20, seed=2)
    per_task = {"cls": (first.x, first.cls), "reg": (second.x, second.reg)}
    losses = torch.stack(
        [
            nn.functional.cross_entropy(module.heads["cls"](module.backbone(first.x)), first.cls),
            nn.functional.mse_loss(module.heads["reg"](module.backbone(second.x)), second.reg),
        ]
    )
    jacobian = loop_jacobian(losses, list(module.backbone.parameters()))
    expected = MGDA().weights(jacobian @ jacobian.T) @ jacobian
    module.zero_grad()
    module.training_step(per_task, 0).backward()
    got = torch.cat([p.grad.flatten() for p in module.backbone.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("same_shape", [True, False])
def test_representation_mode_with_per_task_inputs_matches_the_loop_reference(same_shape, monkeypatch):
    """Per-task batches in one backbone call (stackable) or one call each: every head reads its task's
    view of its own rows, and the backbone receives ``Σ_k w_k ∂L_k/∂z`` with w from the rows' Gramian."""
    if not same_shape:
        monkeypatch.setattr("lightning_mtl.forward._stackable", lambda inputs: False)
    module = make_module(tasks=make_tasks(metrics=False), balancer=MGDA(), gradients="representation")
    first, second = SharedInput(12, seed=1), SharedInput(20 if same_shape else 16, seed=2)
    per_task = {"cls": (first.x, first.cls), "reg": (second.x, second.reg)}
    outputs = [module.backbone(torch.cat([first.x, second.x]))] if same_shape else [module.backbone(first.x), module.backbone(second.x)]
    cls_rows, reg_rows = (outputs[0][:12], outputs[0][12:]) if same_shape else outputs
    losses = torch.stack(
        [
            nn.functional.cross_entropy(module.heads["cls"](cls_rows), first.cls),
            nn.functional.mse_loss(module.heads["reg"](reg_rows), second.reg),
        ]
    )
    jacobian = loop_jacobian(losses, outputs)
    weights = MGDA().weights(jacobian @ jacobian.T)
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(weights @ losses, list(module.backbone.parameters()))])
    module.zero_grad()
    module.training_step(per_task, 0).backward()
    got = torch.cat([p.grad.flatten() for p in module.backbone.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    step = module._pending_log[0]  # the weights to be logged, in task order
    assert not torch.allclose(weights[0], weights[1])
    torch.testing.assert_close(step.weights, weights, rtol=1e-5, atol=1e-6)
    for name, (x, y) in per_task.items():  # each head its plain gradient
        loss = module.tasks[name].loss(module.heads[name](module.backbone(x).detach()), y)
        for p, want in zip(module.heads[name].parameters(), torch.autograd.grad(loss, list(module.heads[name].parameters()))):
            torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["parameters", "representation"])
def test_accumulation_balances_the_micro_batch_gradients_themselves_for_a_scale_dependent_method(mode):
    """Lightning divides the loss by accumulate_grad_batches; Nash-MTL (weights ~ 1/‖g‖) must see the undivided gradients."""
    pytest.importorskip("cvxpy")
    from lightning_mtl.balancers import NashMTL

    data = SharedInput(32)
    module = make_module(tasks=make_tasks(metrics=False), balancer=NashMTL(max_norm=0.0), gradients=mode,
                         optimizer=lambda p: torch.optim.SGD(p, lr=1.0))  # fmt: skip
    reference = copy.deepcopy(module)
    before = [p.detach().clone() for p in module.parameters()]
    grads = [balanced_gradient(reference, data.x[i : i + 16], {"cls": data.cls[i : i + 16], "reg": data.reg[i : i + 16]}) for i in (0, 16)]
    quiet_trainer(max_steps=1, accumulate_grad_batches=2).fit(module, DataLoader(data, batch_size=16))
    for p, p0, g1, g2 in zip(module.parameters(), before, *grads):
        torch.testing.assert_close(p.detach(), p0 - (g1 + g2) / 2, rtol=1e-5, atol=1e-6)


class TupleBackbone(nn.Module):
    """Returns (features, auxiliary output): heads read ``features[0]``."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(6, 8)

    def forward(self, x):
        z = torch.tanh(self.layer(x))
        return z, z.sum(dim=1)


class FirstOf(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, features):
        return self.head(features[0])


@pytest.mark.parametrize("mode", ["parameters", "representation"])
def test_a_backbone_returning_a_tuple_is_refused_by_gradient_balancers(mode):
    torch.manual_seed(0)
    tasks = [Task("cls", FirstOf(nn.Linear(8, 2)), nn.CrossEntropyLoss()),
             Task("reg", FirstOf(nn.Sequential(nn.Linear(8, 1), nn.Flatten(0))), nn.MSELoss())]  # fmt: skip
    module = MultiTaskModule(TupleBackbone(), tasks, balancer="mgda", gradients=mode)
    x, labels = batch()
    with pytest.raises(TypeError, match="TupleBackbone returned a tuple.*use a loss-level balancer"):
        module.training_step((x, labels), 0)
    plain = MultiTaskModule(TupleBackbone(), tasks, balancer="uw")  # a loss-level method does not need one tensor
    assert torch.isfinite(plain.training_step((x, labels), 0))


class TiedHead(nn.Module):
    def __init__(self, shared):
        super().__init__()
        self.shared, self.out = shared, nn.Linear(6, 2)

    def forward(self, z):
        return self.out(z @ self.shared.weight)


@pytest.mark.parametrize("mode", ["parameters", "representation"])
def test_a_head_tied_to_the_backbone_is_refused_by_gradient_balancers(mode):
    shared = nn.Linear(6, 6, bias=False)
    tasks = [Task("cls", TiedHead(shared), nn.CrossEntropyLoss()),
             Task("reg", nn.Sequential(nn.Linear(6, 1), nn.Flatten(0)), nn.MSELoss())]  # fmt: skip
    with pytest.raises(ValueError, match="task 'cls': its head .*shares parameters with the backbone.*Untie"):
        MultiTaskModule(nn.Sequential(shared, nn.Tanh()), tasks, balancer="upgrad", gradients=mode)
    MultiTaskModule(nn.Sequential(shared, nn.Tanh()), tasks, balancer="dwa")  # loss level: fine


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_step_skipped_in_representation_mode_logs_nothing(what, recording_logger):
    data = SharedInput(16)
    if what == "loss":
        data.reg[3] = float("inf")
        tasks = make_tasks(metrics=False)
    else:
        tasks = tasks_with_an_infinite_gradient()
    module = make_module(tasks=tasks, balancer="mgda", gradients="representation", nonfinite_loss="skip")
    with pytest.warns(UserWarning, match="the step is skipped"):
        quiet_trainer(max_steps=1, logger=recording_logger, log_every_n_steps=1).fit(module, DataLoader(data, batch_size=16))
    logged = [metrics for _, metrics in recording_logger.history]
    assert not any("train/loss" in metrics or "train/cls/weight" in metrics for metrics in logged)


@pytest.mark.parametrize("stem", [True, False], ids=["after-a-stem", "first-layer"])
def test_reentrant_checkpointing_is_refused_with_the_fix_and_non_reentrant_is_exact(stem):
    """use_reentrant=True hides the checkpointed parameters from autograd.grad: an error (was zero rows or a crash)."""
    from torch.utils.checkpoint import checkpoint

    from lightning_mtl.gradients import parameter_jacobian

    torch.manual_seed(0)
    first, block = nn.Linear(5, 5), nn.Linear(5, 5)
    x = torch.randn(4, 5, requires_grad=not stem)
    params = [*first.parameters(), *block.parameters()] if stem else list(block.parameters())
    cotangents = [torch.randn(3, 4, 5)]
    z = checkpoint(block, first(x) if stem else x, use_reentrant=True)
    with pytest.raises(ValueError, match="reentrant activation checkpointing.*use_reentrant=False"):
        parameter_jacobian([z], cotangents, params)
    z = checkpoint(block, first(x) if stem else x, use_reentrant=False)
    jacobian = parameter_jacobian([z], cotangents, params)
    for k in range(3):
        expected = torch.autograd.grad(z, params, cotangents[0][k], retain_graph=True)
        for got, want in zip(jacobian, expected):
            torch.testing.assert_close(got[k], want)


def test_global_columns_place_widths_past_float32_precision_exactly():
    """DDP representation mode (GradDrop): each process's columns go at ``rank · width`` of the global matrix. The
    width was all-reduced in float32, which rounds 2**24 + 1 down: the blocks overlapped and the last rank raised."""
    from types import SimpleNamespace

    from lightning_mtl.updates.gradient import _in_global_columns

    width = 2**24 + 1
    flat = torch.ones(1, width)
    for rank in (0, 1):
        context = SimpleNamespace(world_size=2, rank=rank, all_reduce=lambda tensor, op: tensor)
        padded, columns = _in_global_columns(flat, context)
        assert padded.shape == (1, 2 * width) and columns == slice(rank * width, (rank + 1) * width)
        assert int(padded[0, columns].count_nonzero()) == width and int(padded.count_nonzero()) == width


@pytest.mark.parametrize("gradients", ["parameters", "representation"])
def test_a_users_weights_override_of_the_old_signature_is_called_without_entries(gradients):
    """The module passes the Gramian's ``entries`` to a ``weights`` that takes them; a user's override written before
    the argument existed (no ``entries``, no ``**kwargs``) is called as before and gives its own weights."""
    from lightning_mtl.balancers.base import GramianBalancer

    class Halves(GramianBalancer):
        calls = 0

        def weights(self, gramian, losses=None, present=None, nonzero=None):
            Halves.calls += 1
            return super().weights(gramian, losses, present, nonzero)

        def _weights(self, gramian, present):
            return torch.full((gramian.shape[0],), 0.5, dtype=torch.float64)

    module = make_module(tasks=make_tasks(metrics=False), balancer=Halves(), gradients=gradients)
    x, labels = batch()
    module.training_step((x, labels), 0).backward()
    assert Halves.calls == 1
    assert module.last_step.weights.tolist() == [0.5, 0.5]
