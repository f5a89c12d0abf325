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


@pytest.mark.parametrize("weight", [True, "0.5"])
def test_weight_must_be_a_real_number_not_a_bool_or_string(weight):
    with pytest.raises(TypeError, match="task 'a': weight must be a number"):
        Task("a", nn.Linear(2, 2), nn.CrossEntropyLoss(), weight=weight)


def test_a_loss_class_instead_of_an_instance_is_named():
    with pytest.raises(TypeError, match=r"task 'a': loss is the class CrossEntropyLoss, not a loss; .*CrossEntropyLoss\(\)"):
        Task("a", nn.Linear(2, 2), nn.CrossEntropyLoss)


@pytest.mark.parametrize(
    "metrics",
    [
        {"loss": MulticlassAccuracy(2)},
        {"weight": MulticlassAccuracy(2)},
        MetricCollection({"loss": MulticlassAccuracy(2)}),
        MetricCollection([MulticlassAccuracy(2)], prefix="x/"),
    ],
    ids=["dict-loss", "dict-weight", "collection-loss", "collection-prefix-with-slash"],
)
def test_metric_names_that_clash_with_log_keys_are_refused(metrics):
    with pytest.raises(ValueError, match="task 'a'"):
        Task("a", nn.Linear(2, 2), nn.CrossEntropyLoss(), metrics)


def test_the_ignore_index_of_a_partial_loss_is_read():
    from functools import partial

    task = Task("a", nn.Linear(2, 2), partial(nn.functional.cross_entropy, ignore_index=255))
    assert task.ignore_index == 255
