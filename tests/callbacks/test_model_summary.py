"""MultiTaskModelSummary: Lightning's model summary plus shared vs per-task parameter counts."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelSummary
from torch import nn
from torch.utils.data import DataLoader

from conftest import quiet_trainer
from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.architectures import MLP, MMoE, parameter_counts
from lightning_mtl.callbacks import MultiTaskModelSummary
from lightning_mtl.callbacks.model_summary import format_parameter_rows, parameter_rows


def tasks(width, names=("a", "b")):
    return [Task(name, nn.Linear(width, 3), nn.CrossEntropyLoss()) for name in names]


def numel(parameters, trainable=False):
    return sum(p.numel() for p in parameters if p.requires_grad or not trainable)


class Samples(torch.utils.data.Dataset):
    def __init__(self, names):
        self.x = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
        self.names = names

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.x[i], {name: torch.tensor(0) for name in self.names}


def fit(module, callback):
    trainer = quiet_trainer(callbacks=[callback], enable_model_summary=True, max_steps=1)
    trainer.fit(module, DataLoader(Samples(getattr(module, "task_names", ["a"])), batch_size=4))
    return trainer


def test_hard_sharing_counts_equal_sums_over_the_modules_trainable_and_total():
    module = MultiTaskModule(MLP(10, [5, 4]), tasks(4), balancer="uw")  # UW: two log-variances of its own
    first = next(module.backbone.parameters())
    first.requires_grad_(False)  # a frozen pretrained layer: shared but not trainable
    module.heads["b"].bias.requires_grad_(False)
    rows = parameter_rows(module)
    backbone, a, b = module.backbone.parameters(), module.heads["a"].parameters(), module.heads["b"].parameters()
    assert rows == [
        ("shared", numel(module.backbone.parameters(), True), numel(backbone)),
        ("task a", numel(module.heads["a"].parameters(), True), numel(a)),
        ("task b", 4 * 3, numel(b)),
        ("other", 2, 2),
        ("total", numel(module.parameters(), True), numel(module.parameters())),
    ]
    assert rows[0] == ("shared", 10 * 5 + 5 + 5 * 4 + 4 - 10 * 5, 10 * 5 + 5 + 5 * 4 + 4)
    counts = parameter_counts(module)
    assert [row[2] for row in rows[:3]] == [counts["shared"], counts["a"], counts["b"]]


def test_an_architecture_s_task_parameters_count_for_their_task():
    module = MultiTaskModule(MMoE(10, 4, 3, ["a", "b"]), tasks(4))
    module.backbone.gates["a"].requires_grad_(False)
    rows = {part: (trainable, total) for part, trainable, total in parameter_rows(module)}
    for name in ("a", "b"):
        own = [*module.backbone.task_parameters(name), *module.heads[name].parameters()]
        assert rows[f"task {name}"] == (numel(own, True), numel(own))
    assert rows["task a"] == (15, 10 * 3 + 15)  # its gate (no bias) is frozen, its head is not
    owned = {id(p) for name in ("a", "b") for p in module.backbone.task_parameters(name)}
    shared = [p for p in module.backbone.parameters() if id(p) not in owned]
    assert rows["shared"] == (numel(shared), numel(shared)) == (3 * (10 * 4 + 4),) * 2
    assert "other" not in rows
    assert rows["total"] == (numel(module.parameters(), True), numel(module.parameters()))


def test_tied_parameters_count_once_as_parameter_counts_does():
    backbone = MLP(10, [4])
    head = nn.Linear(4, 3)
    module = MultiTaskModule(backbone, [Task("a", head, nn.CrossEntropyLoss()), Task("b", nn.Linear(4, 3), nn.CrossEntropyLoss())])
    module.heads["b"].weight = head.weight  # tied between the heads: counted for 'a', the first
    rows = parameter_rows(module)
    counts = parameter_counts(module)
    assert [(part, total) for part, _, total in rows] == [
        ("shared", counts["shared"]), ("task a", counts["a"]), ("task b", counts["b"]), ("total", numel(module.parameters()))
    ]
    assert [trainable for _, trainable, _ in rows] == [total for _, _, total in rows]
    assert counts["b"] == 3


def test_replaces_lightning_s_default_summary_and_keeps_max_depth(capsys):
    module = MultiTaskModule(MLP(10, [5]), tasks(5))
    callback = MultiTaskModelSummary(max_depth=2)
    layers = []
    callback.summarize = lambda summary_data, *args, **kwargs: layers.append(dict(summary_data)["Name"])
    trainer = fit(module, callback)
    assert [type(cb) for cb in trainer.callbacks if isinstance(cb, ModelSummary)] == [MultiTaskModelSummary]
    assert "heads.a" in layers[0] and "backbone" in layers[0]  # depth 2: the heads inside the ModuleDict
    out = capsys.readouterr().out
    assert "Parameters shared by the tasks and each task's own" in out
    for part, trainable, total in parameter_rows(module):
        line = next(line for line in out.splitlines() if line.startswith(part + " "))
        assert line.split()[-4:-2] == [f"{trainable:,}", f"{total:,}"]

    depth_one = MultiTaskModelSummary()
    depth_one.summarize = lambda summary_data, *args, **kwargs: layers.append(dict(summary_data)["Name"])
    fit(MultiTaskModule(MLP(10, [5]), tasks(5)), depth_one)
    assert "heads.a" not in layers[1] and "heads" in layers[1]


def test_max_depth_zero_prints_nothing(capsys):
    callback = MultiTaskModelSummary(max_depth=0)
    callback.summarize = lambda *args, **kwargs: pytest.fail("Lightning's summary printed with max_depth=0")
    fit(MultiTaskModule(MLP(10, [5]), tasks(5)), callback)
    assert "Parameters" not in capsys.readouterr().out


def test_a_task_named_shared_is_warned_about_and_training_goes_on(capsys):
    module = MultiTaskModule(MLP(10, [5]), tasks(5, ("shared", "b")))
    callback = MultiTaskModelSummary()
    callback.summarize = lambda *args, **kwargs: None
    with pytest.warns(UserWarning, match="task is named 'shared'"):
        trainer = fit(module, callback)
    assert trainer.global_step == 1
    assert "Parameters" not in capsys.readouterr().out


def test_a_model_without_tasks_is_refused():
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(10, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="use it with a MultiTaskModule, or Lightning's ModelSummary"):
        fit(Plain(), MultiTaskModelSummary())


def test_format_has_fixed_width_columns_and_shares():
    text = format_parameter_rows([("shared", 750, 1_000), ("task a", 1_500, 3_000), ("total", 2_250, 4_000)])
    lines = text.splitlines()
    assert lines[0].split() == ["parameters", "trainable", "total", "share"]
    assert lines[2].split() == ["shared", "750", "1,000", "25.0", "%"]
    assert lines[3].split() == ["task", "a", "1,500", "3,000", "75.0", "%"]
    assert len({len(line) for line in lines}) == 1
