"""The module's units (forward, evaluation, balancing path) follow the module: settings reassigned after
construction take effect, copies and pickles read their own module, and no reference cycle keeps a model alive."""

import copy
import gc
import pickle
import weakref

import pytest
import torch

from lightning_mtl.balancers import UW
from test_gradient_balancing import batch
from test_module import make_module, make_tasks


def test_a_balancer_assigned_after_construction_is_the_one_used():
    module = make_module(tasks=make_tasks(metrics=False))
    uw = UW()
    uw.setup(module.task_names)
    module.balancer = uw
    x, labels = batch()
    loss = module.training_step((x, labels), 0)
    assert module.balancing.balancer is uw
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in uw.parameters())  # UW's parameters trained


def test_nonfinite_policy_and_gradient_mode_assigned_after_construction_take_effect():
    module = make_module(tasks=make_tasks(metrics=False), balancer="mgda")
    module.gradients = "representation"
    x, labels = batch()
    module.training_step((x, labels), 0).backward()
    assert type(module.balancing).__name__ == "RepresentationPath"
    module.nonfinite_loss = "skip"
    labels = dict(labels, reg=torch.full_like(labels["reg"], float("inf")))
    with pytest.warns(UserWarning, match="skipped"):  # found by the backward in representation mode
        module.training_step((x, labels), 1).backward()
    assert module.last_step.skipped


def test_a_deleted_module_is_freed_without_the_garbage_collector():
    gc.disable()
    try:
        for balancer in (None, "mgda"):
            module = make_module(tasks=make_tasks(metrics=False), balancer=balancer)
            ref = weakref.ref(module)
            del module
            assert ref() is None, balancer
    finally:
        gc.enable()


@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_copies_read_their_own_module(duplicate):
    module = make_module(tasks=make_tasks(metrics=False), balancer="mgda")
    copied = duplicate(module)
    assert copied.task_forward.module is copied and copied.evaluation.module is copied
    assert copied.balancing.balancer is copied.balancer
    x, labels = batch()
    copied.training_step((x, labels), 0).backward()
    assert all(p.grad is None for p in module.parameters())  # the original was not touched
    assert all(p.grad is not None for p in copied.backbone.parameters())
