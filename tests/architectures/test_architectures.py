"""Multi-task architectures: output shapes, gradient flow per task, gates, YAML, parameter counts, bad input."""

import math

import pytest
import torch
from jsonargparse import ArgumentParser
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from conftest import quiet_trainer
from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.architectures import (
    CGC,
    MLP,
    MMoE,
    MTAN,
    OMoE,
    PLE,
    CrossStitch,
    DSelectK,
    MultiTaskBackbone,
    RegressionHead,
    RNNEncoder,
    SmallCNN,
    SoftSharing,
    parameter_counts,
)

TASKS = ["a", "b", "c"]
IMAGES = torch.rand(6, 1, 12, 20)
WIDTH = 16  # every architecture below outputs (batch, WIDTH) per task


def small_cnn():
    return SmallCNN(channels=(4, 8), out_features=WIDTH, input_size=(12, 20))


def build(name, tasks=TASKS):
    torch.manual_seed(0)
    return {
        "MMoE": lambda: MMoE(240, WIDTH, 4, tasks, expert_hidden=(12,)),
        "OMoE": lambda: OMoE(240, WIDTH, 4, tasks),
        "CGC": lambda: CGC(240, WIDTH, tasks, num_shared_experts=2, num_task_experts=2),
        "PLE": lambda: PLE(240, WIDTH, tasks, num_levels=3, num_shared_experts=2, num_task_experts=1),
        "DSelectK": lambda: DSelectK(240, WIDTH, 4, tasks, k=2),
        "DSelectK-static": lambda: DSelectK(240, WIDTH, 8, tasks, k=3, per_example=False),
        "CrossStitch-MLP": lambda: CrossStitch(MLP(240, [32, WIDTH]), tasks),
        "CrossStitch-CNN": lambda: CrossStitch(small_cnn(), tasks),
        "MTAN": lambda: MTAN(small_cnn(), tasks),
        "SoftSharing": lambda: SoftSharing(MLP(240, [WIDTH]), tasks),
    }[name]()


ARCHITECTURES = [
    "MMoE", "OMoE", "CGC", "PLE", "DSelectK", "DSelectK-static",
    "CrossStitch-MLP", "CrossStitch-CNN", "MTAN", "SoftSharing",
]  # fmt: skip


def exclusive_parameters(name, model, task):
    """Parameter names that only ``task``'s output may reach."""
    named = {id(p): n for n, p in model.named_parameters()}
    if name == "PLE":
        return {n for n in named.values() if n.startswith(f"levels.{model.num_levels - 1}.task_parts.{task}.")}
    if name.startswith("CrossStitch"):
        return {f"alphas.{task}.{model.num_stages - 1}"}
    return {named[id(p)] for p in model.task_parameters(task)}


def gradients_by_task(model, x):
    """``{task: names of the parameters that get a non-zero gradient from that task's output}``."""
    torch.manual_seed(1)
    reached = {}
    for task in model.tasks:
        model.zero_grad(set_to_none=True)
        out = model(x)
        (out[task] * torch.randn_like(out[task])).sum().backward()
        reached[task] = {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
    return reached


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_output_is_one_tensor_per_task(name):
    model = build(name)
    out = model(IMAGES)
    assert isinstance(model, MultiTaskBackbone) and list(out) == TASKS
    assert all(value.shape == (6, WIDTH) and torch.isfinite(value).all() for value in out.values())


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_parameter_gets_gradient_from_the_tasks_that_use_it_and_only_those(name):
    model = build(name)
    reached = gradients_by_task(model, IMAGES)
    everything = {n for n, _ in model.named_parameters()}
    # no dead parameter: each one is trained by some task
    assert set().union(*reached.values()) == everything
    for task in TASKS:
        own = exclusive_parameters(name, model, task)
        if name != "OMoE":
            assert own, f"{name} has no parameter exclusive to {task}"
        assert own <= reached[task]
        for other in TASKS:
            if other != task:
                assert not own & reached[other], f"{other}'s output reached {task}'s parameters {own & reached[other]}"
    # parameters that belong to no task are reached by every task (shared experts, CNN, ...)
    shared = {n for n, p in model.named_parameters() if id(p) in {id(q) for q in model.shared_parameters()}}
    for task in TASKS:
        assert shared <= reached[task]


@pytest.mark.parametrize("name", ["MMoE", "OMoE", "CGC", "PLE", "DSelectK", "DSelectK-static"])
def test_gate_weights_are_distributions_kept_detached(name):
    model = build(name)
    model(IMAGES)
    gates = model.last_gate_weights
    assert {key.split("/")[0] for key in gates} >= set(TASKS)
    for key, weights in gates.items():
        assert not weights.requires_grad
        assert weights.shape == (6, len(model.gate_expert_names[key]))
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(6))


def test_omoe_gives_every_task_the_same_mixture_and_owns_nothing():
    model = build("OMoE")
    out = model(IMAGES)
    assert torch.equal(out["a"], out["b"]) and not list(model.task_parameters("a"))
    assert len(model.gates) == 1


def test_ple_inner_levels_have_a_shared_gate_over_all_experts():
    model = build("PLE")
    model(IMAGES)
    assert model.gate_expert_names["shared/gate_level0"] == [
        "a_expert_0", "b_expert_0", "c_expert_0", "shared_expert_0", "shared_expert_1",
    ]  # fmt: skip
    assert model.gate_expert_names["a/gate"] == ["a_expert_0", "shared_expert_0", "shared_expert_1"]
    assert "shared/gate" not in model.last_gate_weights  # the last level has task gates only
    assert model.levels[-1].shared_gate is None and model.levels[0].shared_gate is not None


def test_cgc_is_one_level_of_ple():
    model = build("CGC")
    assert model.num_levels == 1 and set(model.last_gate_weights) == set()
    model(IMAGES)
    assert set(model.last_gate_weights) == {"a/gate", "b/gate", "c/gate"}


def test_dselect_k_selects_at_most_k_experts_once_the_smooth_steps_saturate():
    model = DSelectK(240, WIDTH, 8, TASKS, k=2, per_example=False)
    with torch.no_grad():
        for gate in model.gates.values():
            gate.z_logits.copy_(torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0]]))  # codes 101 and 001
    model(IMAGES)
    weights = model.last_gate_weights["a/gate"]
    assert set(weights[0].nonzero().flatten().tolist()) == {5, 1}
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(6))


def test_dselect_k_regularizers():
    power_of_two = DSelectK(240, WIDTH, 4, TASKS, k=2, entropy_regularization=0.5)
    power_of_two(IMAGES)
    losses = power_of_two.regularization_losses()
    assert set(losses) == {"dselect_k_entropy"} and losses["dselect_k_entropy"] > 0
    five = DSelectK(240, WIDTH, 5, TASKS, k=2)
    five(IMAGES)
    assert set(five.regularization_losses()) == {"dselect_k_reachability"}
    # the weights of the 5 real experts out of 8 codes sum to at most 1
    assert (five.last_gate_weights["a/gate"].sum(dim=1) <= 1 + 1e-6).all()
    five.eval()
    five(IMAGES)
    assert five.regularization_losses() == {}


def test_cross_stitch_units_start_near_identity_and_columns_differ():
    model = CrossStitch(MLP(240, [32, WIDTH]), ["a", "b"], self_weight=0.9)
    assert model.num_stages == 2
    torch.testing.assert_close(model.alphas["a"][0].detach(), torch.tensor([0.9, 0.1]))
    three = build("CrossStitch-MLP")
    torch.testing.assert_close(three.alphas["b"][1].detach(), torch.tensor([0.05, 0.9, 0.05]))
    first_a, first_b = model.columns["a"].layers[1].weight, model.columns["b"].layers[1].weight
    assert not torch.equal(first_a, first_b)  # re-initialised copies
    # each weight is stored once in the state_dict
    assert len(model.state_dict()) == len({id(t) for t in model.state_dict().values()})


def test_cross_stitch_with_identity_units_is_independent_columns():
    model = CrossStitch(nn.Sequential(nn.Flatten(), nn.Linear(240, 8), nn.ReLU(), nn.Linear(8, 4)), ["a", "b"], self_weight=1.0)
    out = model(IMAGES)
    expected = model.columns["a"](IMAGES)
    torch.testing.assert_close(out["a"], expected)


def test_mtan_attends_each_block_and_shares_the_cnn_and_its_head():
    model = build("MTAN")
    assert len(model.attention["a"]) == 2
    counts = {n: sum(p.numel() for p in model.task_parameters(n)) for n in TASKS}
    assert len(set(counts.values())) == 1 and counts["a"] > 0
    shared = sum(p.numel() for p in model.shared_parameters())
    assert shared == sum(p.numel() for p in model.backbone.parameters())
    # a CNN without a fixed input size (pooled head) works too
    pooled = MTAN(SmallCNN(channels=(4, 8, 8), out_features=10), ["a", "b"])
    assert pooled(torch.rand(2, 1, 17, 23))["b"].shape == (2, 10)


def test_soft_sharing_towers_start_identical_and_are_separate_copies():
    model = build("SoftSharing")
    a, b = model.towers["a"].layers[1].weight, model.towers["b"].layers[1].weight
    assert torch.equal(a, b) and a is not b
    assert model.out_features == WIDTH


# ---------------------------------------------------------------------------- YAML (jsonargparse)
def _instantiate(config):
    parser = ArgumentParser()
    parser.add_argument("--model", type=nn.Module)
    namespace = parser.parse_object({"model": config})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return instantiate(namespace).model


MLP_CONFIG = {"class_path": "lightning_mtl.architectures.MLP", "init_args": {"in_features": 240, "hidden": [16]}}
CNN_CONFIG = {
    "class_path": "lightning_mtl.architectures.SmallCNN",
    "init_args": {"channels": [4, 8], "out_features": 16, "input_size": [12, 20]},
}


@pytest.mark.parametrize(
    "class_path, init_args",
    [
        ("MMoE", {"in_features": 240, "expert_features": 8, "num_experts": 3, "tasks": ["a", "b"], "expert_hidden": [16]}),
        ("OMoE", {"in_features": 240, "expert_features": 8, "num_experts": 3, "tasks": ["a", "b"]}),
        ("CGC", {"in_features": 240, "expert_features": 8, "tasks": ["a", "b"], "num_shared_experts": 2}),
        ("PLE", {"in_features": 240, "expert_features": 8, "tasks": ["a", "b"], "num_levels": 2}),
        ("DSelectK", {"in_features": 240, "expert_features": 8, "num_experts": 4, "tasks": ["a", "b"], "k": 2}),
        ("CrossStitch", {"column": MLP_CONFIG, "tasks": ["a", "b"], "self_weight": 0.8}),
        ("MTAN", {"backbone": CNN_CONFIG, "tasks": ["a", "b"]}),
        ("SoftSharing", {"tower": MLP_CONFIG, "tasks": ["a", "b"], "penalty": "trace_norm", "weight": 0.01}),
        ("RNNEncoder", {"input_size": 12, "hidden_size": 8, "cell": "gru", "input_layout": "image_columns"}),
    ],
)
def test_every_architecture_builds_from_yaml(class_path, init_args):
    model = _instantiate({"class_path": f"lightning_mtl.architectures.{class_path}", "init_args": init_args})
    assert type(model).__name__ == class_path
    out = model(IMAGES)
    assert set(out) == {"a", "b"} if isinstance(out, dict) else out.shape == (6, 8)


# ---------------------------------------------------------------------------- parameter counts
def linear_tasks(width, names=("a", "b")):
    return [Task(name, nn.Linear(width, 3), nn.CrossEntropyLoss()) for name in names]


def test_parameter_counts_of_hard_sharing_mmoe_and_soft_sharing():
    hard = MultiTaskModule(MLP(10, [5]), linear_tasks(5))
    assert parameter_counts(hard) == {"shared": 10 * 5 + 5, "a": 5 * 3 + 3, "b": 5 * 3 + 3}
    mmoe = MultiTaskModule(MMoE(10, 4, 3, ["a", "b"]), linear_tasks(4))
    gate = 10 * 3  # no bias
    assert parameter_counts(mmoe) == {"shared": 3 * (10 * 4 + 4), "a": gate + 15, "b": gate + 15}
    soft = MultiTaskModule(SoftSharing(MLP(10, [4]), ["a", "b"]), linear_tasks(4))
    assert parameter_counts(soft) == {"shared": 0, "a": 44 + 15, "b": 44 + 15}
    module = MultiTaskModule(build("PLE"), linear_tasks(WIDTH, TASKS))
    counts = parameter_counts(module)
    assert sum(counts.values()) == sum(p.numel() for p in module.backbone.parameters()) + sum(
        p.numel() for p in module.heads.parameters()
    )


def test_parameter_counts_rejects_a_task_named_shared():
    module = MultiTaskModule(MLP(10, [5]), linear_tasks(5, ("shared", "b")))
    with pytest.raises(ValueError, match="named 'shared'"):
        parameter_counts(module)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: MMoE(240, 0, 4, TASKS), "`expert_features` must be a positive int, got 0"),
        (lambda: MMoE(240, 8, 0, TASKS), "`num_experts` must be a positive int, got 0"),
        (lambda: OMoE(-1, 8, 2, TASKS), "`in_features` must be a positive int, got -1"),
        (lambda: MMoE(240, 8, 2, TASKS, expert_hidden=(16, 0)), "`expert_hidden` must hold positive ints"),
        (lambda: CGC(240, 8, TASKS, num_shared_experts=0), "`num_shared_experts` must be a positive int, got 0"),
        (lambda: PLE(240, 8, TASKS, num_task_experts=-2), "`num_task_experts` must be a positive int, got -2"),
        (lambda: PLE(240, 8, TASKS, num_levels=0), "`num_levels` must be a positive int, got 0"),
        (lambda: PLE(240, 8, ["shared", "a"]), "'shared' is reserved"),
        (lambda: DSelectK(240, 8, 4, TASKS, k=5), r"`k` must be at most `num_experts` \(4\), got 5"),
        (lambda: DSelectK(240, 8, 1, TASKS), "`num_experts` must be at least 2"),
        (lambda: MMoE(240, 8, 2, []), "`tasks` is empty"),
        (lambda: MMoE(240, 8, 2, ["a", "a"]), r"duplicate name\(s\) \['a'\]"),
        (lambda: MMoE(240, 8, 2, "ab"), "`tasks` must be a sequence of task names"),
        (lambda: MMoE(240, 8, 2, ["a/b"]), "contains '/'"),
        (lambda: CrossStitch(MLP(4, [4]), TASKS, self_weight=1.5), r"`self_weight` must be in \[0, 1\]"),
        (lambda: SoftSharing(MLP(4, [4]), TASKS, penalty="l1"), "`penalty` must be one of"),
        (lambda: SoftSharing(MLP(4, [4]), TASKS, weight=-1.0), "`weight` must be a number >= 0"),
        (lambda: SoftSharing(nn.ReLU(), TASKS), "`tower` has no parameters"),
    ],
)
def test_bad_sizes_and_task_lists_raise_value_errors_naming_the_argument(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_cross_stitch_needs_a_column_with_stages():
    with pytest.raises(TypeError, match="`column` must be a SmallCNN, an MLP, or an nn.Sequential"):
        CrossStitch(nn.Linear(3, 3), TASKS)


@pytest.mark.parametrize("backbone", [MLP(240, [16]), nn.Linear(240, 16), RNNEncoder(12, 8)])
def test_mtan_without_feature_maps_names_the_backbone_argument(backbone):
    with pytest.raises(TypeError, match=r"MTAN: `backbone` \(\w+\) exposes no feature maps: it needs a `blocks`"):
        MTAN(backbone, TASKS)


def test_mtan_block_without_convolution():
    backbone = nn.Module()
    backbone.blocks = nn.ModuleList([nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))])
    with pytest.raises(ValueError, match=r"`backbone.blocks\[0\]` has no Conv2d"):
        MTAN(backbone, TASKS)


def test_architecture_missing_a_module_task_fails_naming_it():
    # MultiTaskModule checks the architecture's task list when it is built (via check_tasks)
    with pytest.raises(ValueError, match=r"it has no output for task\(s\) \['c'\]"):
        MultiTaskModule(MMoE(240, 8, 2, ["a", "b"]), linear_tasks(8, ("a", "b", "c")))
    with pytest.raises(ValueError, match=r"it has no output for task\(s\) \['c'\]"):
        MMoE(240, 8, 2, ["a", "b"]).check_tasks(["a", "b", "c"])


def test_architecture_with_a_task_the_module_lacks_is_reported():
    with pytest.raises(ValueError, match=r"its task\(s\) \['extra'\] have no head"):
        MultiTaskModule(MMoE(240, 8, 2, ["a", "b", "extra"]), linear_tasks(8, ("a", "b")))
    with pytest.raises(ValueError, match="has no task 'z'"):
        next(MMoE(240, 8, 2, ["a", "b"]).task_parameters("z"))


# ---------------------------------------------------------------------------- bf16-mixed fits
class Images(Dataset):
    """MultiDigits-shaped images with a class and a regression target."""

    def __init__(self, n=48):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 1, 12, 20, generator=g)
        self.a = (self.x[:, 0, :, :10].mean(dim=(1, 2)) > self.x[:, 0, :, 10:].mean(dim=(1, 2))).long()
        self.b = self.x.mean(dim=(1, 2, 3)) * 4

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {"a": self.a[i], "b": self.b[i]}


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHITECTURES + ["RNNEncoder"])
def test_trains_inside_multitask_module_under_bf16_mixed(name):
    if name == "RNNEncoder":
        backbone = RNNEncoder(12, WIDTH, bidirectional=True, pooling="mean", input_layout="image_columns")
        width = 2 * WIDTH
    else:
        backbone, width = build(name, ["a", "b"]), WIDTH
    tasks = [
        Task("a", nn.Linear(width, 2), nn.CrossEntropyLoss(), MulticlassAccuracy(2, average="micro")),
        Task("b", RegressionHead(width), nn.MSELoss()),
    ]
    module = MultiTaskModule(backbone, tasks, optimizer=lambda params: torch.optim.Adam(params, lr=1e-2))
    before = [p.detach().clone() for p in module.backbone.parameters()]
    trainer = quiet_trainer(precision="bf16-mixed", max_epochs=2)
    trainer.fit(module, DataLoader(Images(), batch_size=16))
    loss = trainer.callback_metrics["train/loss"]
    assert math.isfinite(float(loss))
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, module.backbone.parameters())]
    assert all(changed), f"{sum(not c for c in changed)} backbone parameters were not updated"
    assert all(p.dtype == torch.float32 for p in module.parameters())


def test_input_dependent_regularisers_cover_every_backbone_call_of_a_step():
    """Per-task inputs that cannot be stacked run the backbone once per task: DSelectK's regulariser must
    then cover all of them (weighted by samples), as one stacked call does, not only the last call."""
    torch.manual_seed(0)
    tasks = [
        Task("a", nn.Linear(4, 3), nn.CrossEntropyLoss()),
        Task("b", nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)), nn.MSELoss()),
    ]
    module = MultiTaskModule(DSelectK(6, 4, 3, ["a", "b"], entropy_regularization=1.0), tasks, balancer="upgrad")
    g = torch.Generator().manual_seed(1)
    xa, ya = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    xb, yb = torch.randn(8, 6, generator=g), torch.randn(8, generator=g)
    logged = {}
    module.log = lambda key, value, **kwargs: logged.__setitem__(key, float(value))

    def step(batch):
        module.zero_grad()
        module.training_step(batch, 0).backward()
        return dict(logged), [p.grad.clone() for p in module.backbone.parameters()]

    stacked, stacked_grads = step({"a": (xa, ya), "b": (xb, yb)})
    apart, apart_grads = step({"a": (xa, ya), "b": (xb.view(8, 2, 3), yb)})  # DSelectK flattens its input
    for key in ("train/dselect_k_entropy", "train/dselect_k_reachability"):
        assert apart[key] == pytest.approx(stacked[key], rel=1e-5)
    for got, want in zip(apart_grads, stacked_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
