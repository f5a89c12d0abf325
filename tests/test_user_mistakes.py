"""Common mistakes fail at the first step with an error naming the task (issue: a user's first hour)."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy

from conftest import quiet_trainer
from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.evaluation import _check_num_classes
from test_module import SharedInput


def fit(reg_head, reg_loss, cls_metrics=None, reg_metrics=None, cls_head=None, stage="fit"):
    torch.manual_seed(0)
    tasks = [
        Task("cls", cls_head or nn.Linear(8, 2), nn.CrossEntropyLoss(), cls_metrics),
        Task("reg", reg_head, reg_loss, reg_metrics),
    ]
    module = MultiTaskModule(nn.Sequential(nn.Linear(6, 8), nn.Tanh()), tasks)
    loader = DataLoader(SharedInput(32), batch_size=8)
    trainer = quiet_trainer(max_epochs=1)
    if stage == "fit":
        trainer.fit(module, loader)
    else:
        trainer.validate(module, loader, verbose=False)
    return module


@pytest.mark.parametrize(
    "loss", [nn.MSELoss(), nn.L1Loss(), nn.HuberLoss(), F.mse_loss, functools.partial(F.smooth_l1_loss, beta=0.5)],
    ids=["MSELoss", "L1Loss", "HuberLoss", "mse_loss", "partial-smooth_l1"],
)
def test_an_n_by_1_head_against_n_targets_is_refused_naming_the_task_and_shapes(loss):
    with pytest.raises(ValueError, match=r"task 'reg': the head's prediction has shape \(8, 1\) but the target has shape \(8,\).*nn.Flatten\(0\)"):
        fit(nn.Linear(8, 1), loss)


def test_the_shape_check_also_guards_evaluation():
    with pytest.raises(ValueError, match=r"task 'reg': the head's prediction has shape \(8, 1\)"):
        fit(nn.Linear(8, 1), nn.MSELoss(), stage="validate")


def test_matching_shapes_and_class_losses_pass():
    module = fit(nn.Sequential(nn.Linear(8, 1), nn.Flatten(0)), nn.MSELoss())
    assert module.trainer.global_step == 4


def test_a_class_metric_of_another_width_than_the_head_is_refused_naming_task_and_metric():
    with pytest.raises(ValueError, match=r"task 'cls': metric 'acc' \(MulticlassAccuracy\) expects 10 classes, but the head predicts scores of shape \(8, 3\)"):
        fit(nn.Sequential(nn.Linear(8, 1), nn.Flatten(0)), nn.MSELoss(), cls_head=nn.Linear(8, 3),
            cls_metrics={"acc": MulticlassAccuracy(10)})  # fmt: skip


def test_a_multiclass_metric_on_a_single_logit_points_to_binary_metrics():
    with pytest.raises(ValueError, match=r"task 'cls': metric 'acc' .* expects 10 classes.*\(8, 1\).*use BinaryAccuracy"):
        _check_num_classes("cls", "acc", MulticlassAccuracy(10), torch.randn(8, 1))
    _check_num_classes("cls", "acc", MulticlassAccuracy(10), torch.randn(8, 10))  # the right width passes
    _check_num_classes("cls", "acc", MulticlassAccuracy(10), torch.randint(0, 10, (8,)))  # class indices pass


def test_a_metric_error_names_the_task_and_metric():
    with pytest.raises(Exception, match=r"task 'reg': metric 'acc' \(BinaryAccuracy\) failed on prediction of shape \(8,\)"):
        fit(nn.Sequential(nn.Linear(8, 1), nn.Flatten(0)), nn.MSELoss(), reg_metrics={"acc": BinaryAccuracy()})


class SqueezingMSE(nn.MSELoss):
    """A loss subclass that reshapes its inputs itself: not refused by the element-wise shape check."""

    def forward(self, prediction, target):
        return super().forward(prediction.squeeze(-1), target)


def test_a_loss_subclass_with_its_own_forward_is_not_refused():
    module = fit(nn.Linear(8, 1), SqueezingMSE())
    assert module.trainer.global_step == 4


def test_a_metric_that_fails_to_compute_names_the_task_and_metric():
    from torchmetrics.regression import R2Score

    torch.manual_seed(0)
    tasks = [Task("cls", nn.Linear(8, 2), nn.CrossEntropyLoss()),
             Task("reg", nn.Sequential(nn.Linear(8, 1), nn.Flatten(0)), nn.MSELoss(), {"r2": R2Score()})]  # fmt: skip
    module = MultiTaskModule(nn.Sequential(nn.Linear(6, 8), nn.Tanh()), tasks)
    with pytest.raises(ValueError, match=r"task 'reg': metric 'r2' \(R2Score\) failed to compute: .*two samples"):
        quiet_trainer().validate(module, DataLoader(SharedInput(1), batch_size=1), verbose=False)


@pytest.mark.parametrize("first", ["validate", "test", "validate-two-loaders"])
def test_fit_after_validate_or_test_of_the_same_module_works(first):
    # validate/test run under inference mode; the metrics reset there must not break a later fit's validation
    torch.manual_seed(0)
    tasks = [
        Task("cls", nn.Linear(8, 2), nn.CrossEntropyLoss(), {"acc": MulticlassAccuracy(2)}),
        Task("reg", nn.Sequential(nn.Linear(8, 1), nn.Flatten(0)), nn.MSELoss()),
    ]
    module = MultiTaskModule(nn.Sequential(nn.Linear(6, 8), nn.Tanh()), tasks)
    loader = DataLoader(SharedInput(32), batch_size=8)
    trainer = quiet_trainer(max_epochs=1)
    if first == "test":
        trainer.test(module, loader, verbose=False)
    elif first == "validate":
        trainer.validate(module, loader, verbose=False)
    else:
        trainer.validate(module, [loader, loader], verbose=False)
    val = [loader, loader] if first == "validate-two-loaders" else loader
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(module, loader, val)
    key = "val/cls/acc/dataloader_idx_1" if first == "validate-two-loaders" else "val/cls/acc"
    assert 0.0 <= float(trainer.callback_metrics[key]) <= 1.0
    trainer.validate(module, val, verbose=False)
    trainer.fit(module, loader, val)  # fit again after another validate: max_epochs already reached, still no error
