import pytest
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_mtl import Task
from lightning_mtl.task import snake_case


def test_task_keeps_its_parts():
    head, loss = nn.Linear(4, 3), nn.CrossEntropyLoss(ignore_index=7)
    task = Task("digit", head, loss, MulticlassAccuracy(3), weight=0.5)
    assert task.name == "digit" and task.head is head and task.loss is loss and task.weight == 0.5
    assert list(task.metrics) == ["multiclass_accuracy"]
    assert task.ignore_index == 7
    assert Task("r", nn.Linear(4, 1), torch.nn.functional.mse_loss).ignore_index == -100


def test_metric_names():
    assert snake_case("MulticlassAccuracy") == "multiclass_accuracy"
    assert snake_case("MeanSquaredError") == "mean_squared_error"
    assert snake_case("AUROC") == "auroc"
    task = Task("t", nn.Linear(2, 3), nn.CrossEntropyLoss(), {"acc": MulticlassAccuracy(3)})
    assert list(task.metrics) == ["acc"]
    collection = MetricCollection({"acc": MulticlassAccuracy(3), "f1": MulticlassF1Score(3)})
    assert sorted(Task("t", nn.Linear(2, 3), nn.CrossEntropyLoss(), collection).metrics) == ["acc", "f1"]


@pytest.mark.parametrize("name", ["a/b", "a.b", ""])
def test_bad_task_name(name):
    with pytest.raises(ValueError, match="task name"):
        Task(name, nn.Linear(2, 2), nn.CrossEntropyLoss())


def test_slash_in_name_is_named_and_explained():
    with pytest.raises(ValueError, match=r"'depth/left'.*'/'"):
        Task("depth/left", nn.Linear(2, 2), nn.CrossEntropyLoss())


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_bad_weight(weight):
    with pytest.raises(ValueError, match=r"task 'x': weight must be finite and >= 0"):
        Task("x", nn.Linear(2, 2), nn.CrossEntropyLoss(), weight=weight)


def test_loss_not_callable():
    with pytest.raises(TypeError, match=r"task 'x': loss must be callable"):
        Task("x", nn.Linear(2, 2), "cross_entropy")


def test_head_not_module():
    with pytest.raises(TypeError, match=r"task 'x': head must be an nn.Module"):
        Task("x", lambda z: z, nn.CrossEntropyLoss())


def test_metric_not_metric():
    with pytest.raises(TypeError, match=r"task 'x': metric 'acc' must be a torchmetrics Metric"):
        Task("x", nn.Linear(2, 2), nn.CrossEntropyLoss(), {"acc": lambda p, t: 0})
