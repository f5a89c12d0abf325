"""The layerwise Gramian of parameter mode (lightning_mtl/gramian.py): exact, and never a K × P tensor."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint

import test_gradient_balancing
import test_step_view
from lightning_mtl import MultiTaskModule, Task, gramian, gramian_blocks
from lightning_mtl.balancers import MGDA, UPGrad
from lightning_mtl.gradients import PRODUCT_CHUNK, TaskJacobian, parameter_jacobian, row_products
from lightning_mtl.gramian import LayerRecorder, OutputJacobian, kernel_layers, layerwise_gramian


@pytest.fixture
def layerwise(monkeypatch):
    """Every Gramian weighting step in parameter mode takes the layerwise path, however small the model."""
    monkeypatch.setattr(gramian, "LAYERWISE", "always")


class Reused(nn.Module):
    """``a`` called twice (its weight's gradient is the sum over both calls: the kernel rule covers it) and ``b``'s
    weight also used functionally (the kernel rule would miss that use: ``b`` must go to the fallback)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x):
        h = torch.tanh(self.a(torch.tanh(self.a(x))))
        return self.b(h) + F.linear(h.flip(0), self.b.weight)


class Tied(nn.Module):
    """An embedding whose table is also an output layer's weight (weight tying)."""

    def __init__(self):
        super().__init__()
        self.embed, self.out = nn.Embedding(10, 6), nn.Linear(6, 10, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x):
        return self.out(torch.tanh(self.embed(x))).mean(1)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.gru, self.out = nn.Linear(1, 4), nn.GRU(4, 5, batch_first=True), nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.gru(torch.tanh(self.inp(x.unsqueeze(-1))))[0][:, -1])


class Checkpointed(nn.Module):
    def __init__(self, reentrant=False):
        super().__init__()
        self.stem, self.block = nn.Linear(6, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        self.reentrant = reentrant

    def forward(self, x):
        return checkpoint(self.block, torch.tanh(self.stem(x)), use_reentrant=self.reentrant)


def frozen(backbone, *names):
    for name in names:
        backbone.get_parameter(name).requires_grad_(False)
    return backbone


# name: (backbone, input, layers expected to get the kernel rule (module names), at least one layer in explicit form)
CASES = {
    "mlp-kernel": (lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8)),
                   lambda: torch.randn(5, 6), {"0", "2", "4"}),
    "mlp-explicit-3d-no-bias": (lambda: nn.Sequential(nn.Linear(6, 12, bias=False), nn.ReLU(), nn.Linear(12, 8)),
                                lambda: torch.randn(40, 3, 6), {"0", "2"}),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2, dilation=2),
                                  nn.Flatten(), nn.Linear(45, 7)), lambda: torch.randn(2, 3, 9, 9), {"0", "2", "4"}),
    "conv1d-same-reflect": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3, padding="same", padding_mode="reflect"), nn.ReLU(),
                                                  nn.Conv1d(4, 5, 2, stride=2, dilation=2), nn.Flatten()),
                            lambda: torch.randn(2, 3, 9), {"0", "2"}),
    "layernorm-batchnorm-inplace": (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 8),
                                                          nn.BatchNorm1d(8), nn.ReLU(inplace=True), nn.Linear(8, 8)),
                                    lambda: torch.randn(5, 6), {"0", "2", "5"}),
    "gru": (Recurrent, lambda: torch.randn(3, 6), {"inp", "out"}),
    "inplace-relu-input-needs-grad": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8),
                                                            nn.ReLU(inplace=True)),
                                      lambda: torch.randn(5, 6, requires_grad=True), {"0", "2"}),
    "weight-reused": (Reused, lambda: torch.randn(5, 6), {"a"}),
    "weight-norm": (lambda: nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(6, 8)), nn.Tanh(), nn.Linear(8, 4),
                                          nn.Linear(4, 4, bias=False)), lambda: torch.randn(5, 6), {"2", "3"}),
    "tied-embedding": (Tied, lambda: torch.randint(0, 10, (4, 3)), set()),
    "frozen": (lambda: frozen(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)),
                              "0.weight", "2.weight", "2.bias"), lambda: torch.randn(5, 6), {"0", "4"}),
    "checkpoint": (Checkpointed, lambda: torch.randn(5, 6), {"stem", "block.0", "block.2"}),
}  # fmt: skip


def both_gramians(backbone, x, num_tasks=3, dtype=torch.float64, weights=None):
    torch.manual_seed(0)
    backbone = backbone.to(dtype)
    x = x.to(dtype) if x.is_floating_point() else x
    params = [p for p in backbone.parameters() if p.requires_grad]
    recorder = LayerRecorder()
    recorder.start(params)
    z = backbone(x)
    calls = recorder.stop()
    cotangents = [torch.randn(num_tasks, *z.shape, dtype=dtype)]
    names = {module: name for name, module in backbone.named_modules()}
    kernel = {names[m] for m in kernel_layers(calls, [z], params)}
    got = layerwise_gramian(calls, [z], cotangents, params)
    jacobian = TaskJacobian(params, parameter_jacobian([z], cotangents, params))
    if weights is not None:  # the update Jᵀw: one weighted backward from the outputs, against the Jacobian's
        directions = OutputJacobian([z], cotangents, got).combine(weights.to(dtype))
        update = torch.autograd.grad(z, params, directions, retain_graph=True)
        return update, jacobian.combine(weights.to(dtype)), kernel
    return got, jacobian.gramian(), kernel


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-6)], ids=["float64", "float32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_layerwise_gramian_equals_the_materialised_jacobians(case, dtype, rtol):
    make, inputs, expected_kernel = CASES[case]
    torch.manual_seed(0)
    got, want, kernel = both_gramians(make(), inputs(), dtype=dtype)
    assert kernel == expected_kernel  # which layers the kernel rule covered (the others went to the fallback)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())
    torch.manual_seed(0)
    got, want, _ = both_gramians(make(), inputs(), dtype=dtype, weights=torch.tensor([0.5, -1.0, 2.0]))
    scale = max(w.abs().max().item() for w in want)  # (a bias before BatchNorm has a zero gradient, up to rounding)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale)


def test_both_forms_of_a_layer_block_are_used_and_exact(monkeypatch):
    """Few rows: the kernel form; many: the explicit one, cut into slices when a slice budget is small."""
    used = []
    real = gramian_blocks.layer_gramian

    def spy(module, pieces, dtype):
        n = sum(gramian_blocks.output_rows(module, d).shape[1] for _, d in pieces)
        k, fan_in, fan_out = pieces[0][1].shape[0], gramian_blocks.input_width(module), module.weight.shape[0]
        kernel = gramian_blocks.block_cost(n, fan_in, fan_out, k) < k * fan_in * fan_out * (n + k)
        used.append((n, "kernel" if kernel else "explicit"))
        return real(module, pieces, dtype)

    monkeypatch.setattr(gramian, "layer_gramian", spy)
    monkeypatch.setattr(gramian_blocks, "WORKSPACE", 64)  # explicit blocks in slices of a few output features
    for rows in (4, 300):
        torch.manual_seed(0)
        got, want, _ = both_gramians(nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 8)), torch.randn(rows, 6))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())
    assert used == [(4, "kernel"), (4, "kernel"), (300, "explicit"), (300, "explicit")]


def test_one_backward_per_task_when_the_batched_backward_fails(monkeypatch):
    real = torch._add_batch_dim

    def no_batching(*args):
        raise RuntimeError("Batching rule not implemented")

    monkeypatch.setattr(torch, "_add_batch_dim", no_batching)
    got, want, _ = both_gramians(Recurrent(), torch.randn(3, 6))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(torch, "_add_batch_dim", real)


def test_one_backward_per_task_on_a_torch_without_the_private_vmap_calls(monkeypatch):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    _, want, _ = both_gramians(backbone, x)  # the reference, with torch's batched backward
    params = list(backbone.parameters())
    recorder = LayerRecorder()
    recorder.start(params)
    z = backbone(x)
    calls = recorder.stop()
    torch.manual_seed(0)  # the cotangents both_gramians drew
    cotangents = [torch.randn(3, *z.shape, dtype=torch.float64)]
    monkeypatch.delattr(torch, "_add_batch_dim")  # the private call the batched backward relies on
    got = layerwise_gramian(calls, [z], cotangents, params)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_reentrant_checkpointing_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="reentrant activation checkpointing.*use_reentrant=False"):
        both_gramians(Checkpointed(reentrant=True), torch.randn(5, 6))


def multitask(backbone, width, num_tasks, balancer, dtype=torch.float32):
    torch.manual_seed(1)
    tasks = [Task(f"t{k}", nn.Linear(width, 3), nn.CrossEntropyLoss()) for k in range(num_tasks)]
    return MultiTaskModule(backbone, tasks, balancer=balancer).to(dtype)


def step_grads(module, x, labels):
    module.zero_grad()
    module.training_step((x, labels), 0).backward()
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()], module.last_step.gramian


STEP_CASES = {  # backbone, input, output width
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8)), lambda: torch.randn(8, 6), 8),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8)), lambda: torch.randn(8, 2, 6, 6), 8),
    "fallback": (lambda: nn.Sequential(Recurrent(), nn.LayerNorm(3)), lambda: torch.randn(8, 6), 3),
    "weight-reused": (Reused, lambda: torch.randn(8, 6), 4),
    "frozen": (lambda: frozen(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8)), "0.weight"), lambda: torch.randn(8, 6), 8),
    "checkpoint": (Checkpointed, lambda: torch.randn(8, 6), 4),
}  # fmt: skip


@pytest.mark.parametrize("balancer", [UPGrad, MGDA])
@pytest.mark.parametrize("case", sorted(STEP_CASES))
def test_step_update_and_gramian_equal_the_materialised_path(case, balancer, monkeypatch):
    """The whole step: backbone gets ``Jᵀw``, heads their plain gradients, the step record the same Gramian
    (float32: the module balances float32 losses; float64 exactness is checked on the Gramian and ``Jᵀw`` above)."""
    dtype, tol = torch.float32, 1e-6
    make, inputs, width = STEP_CASES[case]
    torch.manual_seed(0)
    backbone, x = make(), inputs().to(dtype)
    labels = {f"t{k}": torch.randint(0, 3, (x.shape[0],)) for k in range(3)}
    results = {}
    for path in ("never", "always"):
        monkeypatch.setattr(gramian, "LAYERWISE", path)
        torch.manual_seed(0)
        module = multitask(make(), width, 3, balancer(), dtype)
        module.backbone.load_state_dict(backbone.state_dict())
        results[path] = step_grads(module, x, labels)
    (want, want_gramian), (got, got_gramian) = results["never"], results["always"]
    scale = want_gramian.abs().max().item()
    torch.testing.assert_close(got_gramian, want_gramian, rtol=tol, atol=tol * scale)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=tol * 10, atol=tol * 10 * max(w.abs().max().item(), 1e-3))


class LargestTensor(TorchDispatchMode):
    """Every tensor the operations produce (forward, backward, batched backward), by size."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("balancer", ["upgrad", "mgda"])
def test_parameter_mode_step_never_holds_a_task_jacobian_sized_tensor(balancer, monkeypatch):
    """No tensor of K·P/4 entries in a training step and its backward, by the default rule on a model with
    K·P ≥ LAYERWISE_MIN_ENTRIES (the materialised Jacobian, the path before, has blocks of ~K·P/3)."""
    num_tasks, width = 4, 64
    backbone = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
    shared = sum(p.numel() for p in backbone.parameters())
    x = torch.randn(16, width)
    labels = {f"t{k}": torch.randint(0, 3, (16,)) for k in range(num_tasks)}
    largest = {}
    for path, mode in (("layerwise", "auto"), ("materialised", "never")):
        module = multitask(backbone, width, num_tasks, balancer)
        monkeypatch.setattr(gramian, "LAYERWISE", mode)
        monkeypatch.setattr(gramian, "LAYERWISE_MIN_ENTRIES", num_tasks * shared)  # this model counts as large
        with LargestTensor() as spy:
            module.training_step((x, labels), 0).backward()
        largest[path] = spy.largest
    assert largest["materialised"] >= num_tasks * shared / 4  # the spy sees the Jacobian where there is one
    assert largest["layerwise"] < num_tasks * shared / 4
    assert largest["layerwise"] <= width * width  # one weight's gradient


def test_which_steps_record_the_linear_layers(layerwise):
    """A Gramian weighting in one process records the layers (and may form the Gramian layer by layer); a method
    that needs the gradients, or DDP (whose Gramian has cross-process terms), takes the materialised Jacobian."""
    from lightning_mtl.step import StepContext, StepRecord

    def context(world_size):
        return StepContext(0, 0, world_size, 0, None, None, StepRecord(0, 0, ()), None)

    for balancer, world_size, expected in (("upgrad", 1, True), ("upgrad", 2, False), ("graddrop", 1, False), ("dbmtl", 1, False)):
        module = multitask(nn.Sequential(nn.Linear(6, 8)), 8, 2, balancer)
        module.balancing.tap(context(world_size))
        assert (module.balancing.recorder.stop() is not None) is expected, (balancer, world_size)


@pytest.mark.parametrize("balancer", ["upgrad", "static"])
def test_a_step_that_ends_before_combine_leaves_no_global_hook(balancer, layerwise):
    """The layer recorder's global forward hook is removed when a step ends early: a batch without any labelled
    sample (the step returns None) or an error in a task's loss. Left registered, it would slow every module call in
    the process and keep the recorded calls' inputs and graph nodes alive until the next training step."""
    from torch.nn.modules import module as torch_module

    hooks = dict(torch_module._global_forward_hooks)
    module = multitask(nn.Sequential(nn.Linear(6, 8), nn.ReLU()), 8, 2, balancer)
    x = torch.randn(4, 6)
    if balancer == "static":
        module.request_gramian()  # a loss-level step records the layers only when a callback asks for its Gramian
    assert module.training_step((x, {"t0": torch.full((4,), -100), "t1": torch.full((4,), -100)}), 0) is None
    assert dict(torch_module._global_forward_hooks) == hooks
    module.tasks["t1"].loss = lambda prediction, target: 1 / 0  # a loss that raises
    if balancer == "static":
        module.request_gramian()
    with pytest.raises(ZeroDivisionError):
        module.training_step((x, {"t0": torch.zeros(4, dtype=torch.long), "t1": torch.zeros(4, dtype=torch.long)}), 0)
    assert dict(torch_module._global_forward_hooks) == hooks
    assert module.balancing.recorder.calls == []


def recorded(backbone, x):
    params = list(backbone.parameters())
    recorder = LayerRecorder()
    recorder.start(params)
    backbone(x)
    return recorder.stop(), params


@pytest.mark.parametrize("workload, layerwise_from", [("mlp", 3), ("cnn", 40), ("mlp-10m", 2)])
def test_the_default_rule_takes_the_layerwise_path_where_it_is_cheaper_or_the_jacobian_large(workload, layerwise_from):
    """W-MLP (0.5 M parameters, batch 128) from K = 3, where it is estimated (and measured) about as fast or faster;
    W-CNN (1.1 M, convolutions over 64 x 32 x 32 positions, where the layer blocks cost as much as the Jacobian)
    only once K·P ≥ 2^24 (memory); the 10 M-parameter MLP (batch 64) always."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from balancers import cnn_backbone, mlp_backbone

    if workload == "mlp":
        backbone, x = mlp_backbone(), torch.randn(128, 256)
    elif workload == "cnn":
        backbone, x = cnn_backbone(), torch.randn(64, 1, 32, 32)
    else:
        widths = (512, 2048, 2048, 2048, 256)
        backbone = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])])
        x = torch.randn(64, 512)
    calls, params = recorded(backbone, x)
    assert gramian.LAYERWISE == "auto" and gramian.LAYERWISE_MIN_ENTRIES == 1 << 24
    assert [k for k in (2, 3, 4, 10, 40) if gramian.use_layerwise(calls, k, params)] == [k for k in (2, 3, 4, 10, 40) if k >= layerwise_from]


# The Trainer-level exactness tests of parameter mode, on the layerwise path: accumulation, clipping, 16-mixed
# loss scale, non-finite gradients (raise and skip), MMoE's per-task outputs, per-task inputs, BatchNorm/recurrent
# backbones, and a loss-level step's requested Gramian.


def test_accumulation(layerwise):
    test_gradient_balancing.test_accumulation_balances_each_micro_batch("parameters")


def test_clipping(layerwise):
    test_gradient_balancing.test_gradient_clipping_clips_the_balanced_gradient("parameters")


def test_loss_scale_and_accumulation(layerwise):
    test_step_view.test_gramian_is_in_task_loss_units_under_a_loss_scale_and_accumulation("parameters")


def test_requested_gramian_of_a_static_step(layerwise):
    test_step_view.test_requested_gramian_of_a_static_step_is_exact_and_leaves_the_update_unchanged("parameters")
    test_step_view.test_requested_gramian_under_16_mixed_keeps_small_task_gradients()


def test_nonfinite_gradient_raises_and_skips(layerwise):
    test_gradient_balancing.test_nonfinite_task_gradient_of_a_finite_loss_raises_naming_the_task("parameters")
    test_gradient_balancing.test_nonfinite_task_gradient_skip_mode_skips_every_such_step("parameters")


@pytest.mark.parametrize("backbone", sorted(test_gradient_balancing.BACKBONES))
def test_batchnorm_and_recurrent_backbones(layerwise, backbone):
    test_gradient_balancing.test_parameter_mode_is_exact_for_batchnorm_and_recurrent_backbones(backbone)


def test_per_task_outputs_and_inputs(layerwise):
    test_gradient_balancing.test_parameter_mode_with_one_backbone_output_per_task_matches_the_loop_reference()
    test_gradient_balancing.test_parameter_mode_with_per_task_inputs_matches_the_loop_reference()


def test_bf16_mixed_precision_step_is_close_to_float32(layerwise):
    from lightning.pytorch.plugins import MixedPrecision
    from torch.utils.data import DataLoader

    from conftest import quiet_trainer
    from test_module import SharedInput, make_module, make_tasks

    data = SharedInput(32)
    results = []
    for plugins in ([MixedPrecision("bf16-mixed", "cpu")], []):
        module = make_module(tasks=make_tasks(metrics=False), balancer="upgrad", optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        quiet_trainer(max_steps=2, plugins=plugins).fit(module, DataLoader(data, batch_size=16))
        results.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=2e-2)


@pytest.mark.parametrize("width", [5, 4 * PRODUCT_CHUNK - 1, 4 * PRODUCT_CHUNK, 4 * PRODUCT_CHUNK + 1, 6 * PRODUCT_CHUNK + 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_products_equal_the_plain_product_in_chunks_and_tail(width, dtype):
    generator = torch.Generator().manual_seed(width)
    a = torch.randn(7, width, generator=generator, dtype=dtype)
    b = torch.randn(3, width, generator=generator, dtype=dtype)
    exact_aa, exact_ab = a.double() @ a.double().T, a.double() @ b.double().T
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    for product, exact in ((row_products(a), exact_aa), (row_products(a, b), exact_ab)):
        assert product.dtype == dtype and product.shape == exact.shape
        torch.testing.assert_close(product.double(), exact, rtol=0, atol=tolerance * exact_aa.diagonal().max().item())
    transposed = a.T.contiguous().T  # a strided view (not contiguous): the same product, to rounding
    # (below the chunked width this is one mm, which on a column-major float32 input errs by up to ~9e-6)
    loose = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(
        row_products(transposed).double(), exact_aa, rtol=0, atol=loose * exact_aa.diagonal().max().item()
    )


def test_row_products_is_more_accurate_than_one_long_float32_product():
    # the reason for chunking besides speed: one mm accumulates 500k terms in float32
    a = torch.rand(4, 500_000, generator=torch.Generator().manual_seed(0))
    exact = a.double() @ a.double().T
    chunked_error = (row_products(a).double() - exact).abs().max() / exact.abs().max()
    assert chunked_error < 1e-6


def test_row_products_without_rows_and_in_half_precision_are_the_plain_product():
    width = 5 * PRODUCT_CHUNK  # wide enough to be chunked in float32
    a, none = torch.randn(3, width), torch.randn(0, width)
    assert row_products(none).shape == (0, 0) and row_products(a, none).shape == (3, 0)
    assert row_products(none, a).shape == (0, 3)
    for dtype in (torch.float16, torch.bfloat16):  # chunk sums rounded to half precision would lose accuracy: one mm
        half = torch.randn(4, width, generator=torch.Generator().manual_seed(1)).to(dtype)
        assert torch.equal(row_products(half), half @ half.T)
