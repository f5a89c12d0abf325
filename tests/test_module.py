import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.regression import MeanSquaredError

from conftest import quiet_trainer
from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.balancers import Static


class SharedInput(Dataset):
    """Items ``(x, {"cls": class, "reg": value})``; a learnable pair of tasks."""

    def __init__(self, n=128, seed=0, missing_cls=(), missing_reg=()):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.cls = (self.x[:, 0] > 0).long()
        self.reg = self.x[:, 1] * 2.0
        self.cls[list(missing_cls)] = -100
        self.reg[list(missing_reg)] = float("nan")

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {"cls": self.cls[i], "reg": self.reg[i]}


def make_tasks(metrics=True, cls_weight=1.0, reg_weight=1.0):
    torch.manual_seed(1)
    return [
        Task(
            "cls",
            nn.Linear(8, 2),
            nn.CrossEntropyLoss(),
            MulticlassAccuracy(2, average="micro") if metrics else None,
            cls_weight,
        ),
        Task(
            "reg",
            nn.Sequential(nn.Linear(8, 1), nn.Flatten(0)),
            nn.MSELoss(),
            {"mse": MeanSquaredError()} if metrics else None,
            reg_weight,
        ),
    ]


def make_module(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("tasks", make_tasks())
    return MultiTaskModule(nn.Sequential(nn.Linear(6, 8), nn.Tanh()), **kwargs)


def test_forward_returns_one_prediction_per_task():
    module = make_module()
    out = module(torch.randn(5, 6))
    assert set(out) == {"cls", "reg"}
    assert out["cls"].shape == (5, 2) and out["reg"].shape == (5,)


def test_tasks_as_mapping_and_registry_order():
    tasks = make_tasks()
    module = make_module(tasks={"reg": tasks[1], "cls": tasks[0]})
    assert module.task_names == ["reg", "cls"]
    with pytest.raises(ValueError, match=r"tasks\['other'\] is a Task named 'cls'"):
        make_module(tasks={"other": tasks[0]})


def test_duplicate_task_names():
    with pytest.raises(ValueError, match="duplicate task name 'cls'"):
        make_module(tasks=[make_tasks()[0], make_tasks()[0]])


def test_empty_tasks():
    with pytest.raises(ValueError, match="tasks is empty"):
        make_module(tasks=[])


def test_task_name_colliding_with_module_dict_attribute():
    with pytest.raises(ValueError, match="'keys' collides"):
        make_module(tasks=[Task("keys", nn.Linear(8, 2), nn.CrossEntropyLoss())])


def test_shared_and_per_task_batches_give_the_same_loss():
    module = make_module(tasks=make_tasks(metrics=False))
    data = SharedInput(16)
    x, labels = data.x, {"cls": data.cls, "reg": data.reg}
    shared = module.training_step((x, labels), 0)
    per_task = module.training_step({"cls": (x, labels["cls"]), "reg": (x, labels["reg"])}, 0)
    torch.testing.assert_close(shared, per_task)
    out = module(x)
    expected = nn.functional.cross_entropy(out["cls"], labels["cls"]) + nn.functional.mse_loss(out["reg"], labels["reg"])
    torch.testing.assert_close(shared, expected)


def test_per_task_batch_with_a_subset_of_tasks():
    module = make_module(tasks=make_tasks(metrics=False))
    x = torch.randn(4, 6)
    y = torch.tensor([0, 1, 1, 0])
    loss = module.training_step({"cls": (x, y)}, 0)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(module(x)["cls"], y))


def test_per_task_inputs_of_different_shapes_run_separately():
    backbone = nn.Sequential(nn.Flatten(), nn.LazyLinear(8))
    tasks = make_tasks(metrics=False)
    module = MultiTaskModule(backbone, tasks)
    module(torch.randn(1, 6))  # materialise the lazy layer
    with pytest.raises(RuntimeError):  # 12 features cannot go through the 6-wide layer
        module.training_step({"cls": (torch.randn(3, 6), torch.tensor([0, 1, 0])), "reg": (torch.randn(2, 12), torch.randn(2))}, 0)


def test_static_weights_are_applied():
    module = make_module(tasks=make_tasks(metrics=False, cls_weight=0.25, reg_weight=3.0))
    data = SharedInput(16)
    loss = module.training_step((data.x, {"cls": data.cls, "reg": data.reg}), 0)
    out = module(data.x)
    expected = 0.25 * nn.functional.cross_entropy(out["cls"], data.cls) + 3.0 * nn.functional.mse_loss(out["reg"], data.reg)
    torch.testing.assert_close(loss, expected)


def test_balancer_by_name_is_case_insensitive_and_unknown_names_list_the_valid_ones():
    assert isinstance(make_module(balancer="STATIC").balancer, Static)
    with pytest.raises(ValueError, match=r"unknown balancer 'nope'; valid names: \[.*'static'.*\]"):
        make_module(balancer="nope")


def test_missing_labels_are_masked_from_loss():
    module = make_module(tasks=make_tasks(metrics=False))
    data = SharedInput(16, missing_cls=[0, 3, 5], missing_reg=[1, 2])
    loss = module.training_step((data.x, {"cls": data.cls, "reg": data.reg}), 0)
    out = module(data.x)
    keep_cls = torch.ones(16, dtype=torch.bool)
    keep_cls[[0, 3, 5]] = False
    keep_reg = torch.ones(16, dtype=torch.bool)
    keep_reg[[1, 2]] = False
    expected = nn.functional.cross_entropy(out["cls"][keep_cls], data.cls[keep_cls]) + nn.functional.mse_loss(
        out["reg"][keep_reg], data.reg[keep_reg]
    )
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected)


def test_custom_ignore_index_is_read_from_the_loss():
    task = Task("cls", nn.Linear(8, 2), nn.CrossEntropyLoss(ignore_index=9))
    module = make_module(tasks=[task])
    x, y = torch.randn(4, 6), torch.tensor([0, 9, 1, 9])
    loss = module.training_step((x, {"cls": y}), 0)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(module(x)["cls"][[0, 2]], y[[0, 2]]))


def test_task_without_any_label_contributes_nothing():
    module = make_module(tasks=make_tasks(metrics=False))
    data = SharedInput(8, missing_reg=range(8))
    loss = module.training_step((data.x, {"cls": data.cls, "reg": data.reg}), 0)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(module(data.x)["cls"], data.cls))
    # the gradient of the regression head is exactly zero, not NaN
    loss.backward()
    assert module.heads["reg"][0].weight.grad is None or torch.count_nonzero(module.heads["reg"][0].weight.grad) == 0


def test_training_on_partially_labelled_data_logs_finite_metrics(recording_logger):
    module = make_module()
    data = SharedInput(64, missing_cls=range(0, 64, 3), missing_reg=range(0, 64, 2))
    trainer = quiet_trainer(logger=recording_logger, max_epochs=2, log_every_n_steps=1)
    trainer.fit(module, DataLoader(data, batch_size=16), DataLoader(data, batch_size=16))
    for _, metrics in recording_logger.history:
        assert all(math.isfinite(v) for v in metrics.values()), metrics


def test_logged_keys(recording_logger):
    module = make_module()
    trainer = quiet_trainer(logger=recording_logger, max_epochs=1, log_every_n_steps=1)
    trainer.fit(module, DataLoader(SharedInput(64), batch_size=16), DataLoader(SharedInput(32, seed=1), batch_size=16))
    # progress bar shows the combined and the per-task training loss
    assert {"train/loss", "train/cls/loss", "train/reg/loss"} <= set(trainer.progress_bar_metrics)
    trainer.test(module, DataLoader(SharedInput(32, seed=2), batch_size=16))
    expected = {
        "train/loss",
        "train/cls/loss",
        "train/reg/loss",
        "train/cls/multiclass_accuracy",
        "train/reg/mse",
        "val/loss",
        "val/cls/loss",
        "val/reg/loss",
        "val/cls/multiclass_accuracy",
        "val/reg/mse",
        "test/loss",
        "test/cls/loss",
        "test/reg/loss",
        "test/cls/multiclass_accuracy",
        "test/reg/mse",
    }
    assert expected <= recording_logger.keys, expected - recording_logger.keys


def test_validation_metrics_cover_the_whole_split():
    module = make_module()
    val = SharedInput(50, seed=3)
    trainer = quiet_trainer()
    results = trainer.validate(module, DataLoader(val, batch_size=16), verbose=False)[0]
    with torch.no_grad():
        out = module(val.x)
    accuracy = (out["cls"].argmax(1) == val.cls).float().mean()
    mse = nn.functional.mse_loss(out["reg"], val.reg)
    cross_entropy = nn.functional.cross_entropy(out["cls"], val.cls)
    assert results["val/cls/multiclass_accuracy"] == pytest.approx(float(accuracy), abs=1e-6)
    assert results["val/reg/mse"] == pytest.approx(float(mse), rel=1e-5)
    # the epoch loss is the sample-weighted mean over uneven batches (16, 16, 16, 2)
    assert results["val/cls/loss"] == pytest.approx(float(cross_entropy), rel=1e-5)
    assert results["val/loss"] == pytest.approx(float(cross_entropy + mse), rel=1e-5)


class DivergesOnSecondBatch(nn.Module):
    """MSE, but NaN or inf on its second call (a task that diverges on one validation batch)."""

    def __init__(self, bad):
        super().__init__()
        self.bad, self.calls = bad, 0

    def forward(self, prediction, target):
        self.calls += 1
        loss = nn.functional.mse_loss(prediction, target)
        return loss * self.bad if self.calls == 2 else loss


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_diverged_task_is_logged_as_it_is_and_makes_the_total_non_finite(bad):
    """A task's non-finite batch loss is neither dropped from its epoch mean (NaN: torchmetrics' default drops it
    with a warning, so the task reported the mean of its other batches) nor the task left out of the logs and of
    ``val/loss`` (inf: it was taken for a task without data, and the total looked better)."""
    tasks = make_tasks()
    tasks[1].loss = DivergesOnSecondBatch(bad)
    module = make_module(tasks=tasks)
    with pytest.warns(UserWarning, match=r"val/reg/loss is (nan|inf) \(a diverged task\?\)"):
        results = quiet_trainer().validate(module, DataLoader(SharedInput(50, seed=3), batch_size=16), verbose=False)[0]
    value = results["val/reg/loss"]
    assert math.isnan(value) if math.isnan(bad) else value == bad
    assert not math.isfinite(results["val/loss"])
    assert math.isfinite(results["val/cls/loss"]) and "val/reg/mse" in results


def test_predict_step_returns_every_task():
    module = make_module()
    predictions = quiet_trainer().predict(module, DataLoader(SharedInput(20), batch_size=8))
    assert len(predictions) == 3
    assert set(predictions[0]) == {"cls", "reg"} and predictions[0]["cls"].shape == (8, 2)
    per_task = module.predict_step({"reg": (torch.randn(3, 6), torch.randn(3))}, 0)
    assert set(per_task) == {"reg"} and per_task["reg"].shape == (3,)


def test_training_learns_both_tasks():
    module = make_module(optimizer=lambda params: torch.optim.Adam(params, lr=1e-2))
    trainer = quiet_trainer(max_epochs=15)
    trainer.fit(module, DataLoader(SharedInput(256), batch_size=32, shuffle=True))
    results = trainer.validate(module, DataLoader(SharedInput(256, seed=5), batch_size=64), verbose=False)[0]
    assert results["val/cls/multiclass_accuracy"] > 0.9
    assert results["val/reg/mse"] < 0.5


# ---------------------------------------------------------------- bad input


def test_data_for_an_unknown_task():
    module = make_module()
    with pytest.raises(ValueError, match=r"task 'depth', which the model does not have"):
        module.training_step((torch.randn(2, 6), {"depth": torch.randn(2)}), 0)
    with pytest.raises(ValueError, match=r"task 'depth', which the model does not have"):
        module.training_step({"depth": (torch.randn(2, 6), torch.randn(2))}, 0)


def test_task_the_data_never_provides_warns():
    module = make_module()

    class OnlyCls(SharedInput):
        def __getitem__(self, i):
            return self.x[i], {"cls": self.cls[i]}

    with pytest.warns(UserWarning, match=r"task\(s\) \['reg'\]"):
        quiet_trainer().fit(module, DataLoader(OnlyCls(32), batch_size=16))


def test_batch_of_the_wrong_form():
    with pytest.raises(TypeError, match=r"\(x, \{task: y\}\)"):
        make_module().training_step(torch.randn(2, 6), 0)
    with pytest.raises(TypeError, match=r"task 'cls': a per-task batch must map each task to \(x, y\)"):
        make_module().training_step({"cls": torch.randn(2, 6)}, 0)


def test_head_backbone_width_mismatch_names_the_task():
    tasks = make_tasks(metrics=False)
    tasks[1] = Task("reg", nn.Linear(5, 1), nn.MSELoss())
    module = make_module(tasks=tasks)
    with pytest.raises(RuntimeError, match=r"task 'reg': head Linear failed on the backbone output of shape \(4, 8\)"):
        module(torch.randn(4, 6))


def test_loss_failure_names_the_task():
    tasks = make_tasks(metrics=False)
    module = make_module(tasks=tasks)
    with pytest.raises(RuntimeError, match=r"task 'cls': the loss failed"):
        module.training_step((torch.randn(4, 6), {"cls": torch.randn(4, 3)}), 0)


def test_backbone_dict_without_a_task():
    class DictBackbone(nn.Module):
        def forward(self, x):
            return {"cls": x.new_zeros(x.shape[0], 8)}

    module = MultiTaskModule(DictBackbone(), make_tasks(metrics=False))
    with pytest.raises(KeyError, match=r"task 'reg': the backbone returned a dict without this task"):
        module(torch.randn(2, 6))


class NaNAfter(Dataset):
    """Regression targets become NaN-producing (inf) from item ``bad`` on."""

    def __init__(self, n=64, bad=32):
        self.base = SharedInput(n)
        self.bad = bad

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, labels = self.base[i]
        if i >= self.bad:
            labels = {"cls": labels["cls"], "reg": torch.tensor(float("inf"))}
        return x, labels


# loss level, and the gradient-balanced paths (representation mode checks the loss inside the backward)
BALANCED_PATHS = [(None, "parameters"), ("mgda", "parameters"), ("mgda", "representation")]


@pytest.mark.parametrize("balancer, gradients", BALANCED_PATHS)
def test_nonfinite_loss_raises_naming_task_and_step_before_any_update(balancer, gradients):
    module = make_module(tasks=make_tasks(metrics=False), balancer=balancer, gradients=gradients)
    trainer = quiet_trainer(max_epochs=1)
    with pytest.raises(FloatingPointError, match=r"non-finite loss for task\(s\) \['reg'\] at global step 2 \(batch 2\)"):
        trainer.fit(module, DataLoader(NaNAfter(64, bad=32), batch_size=16))
    assert_parameters_after_good_steps(module, NaNAfter(64, bad=32), steps=2, balancer=balancer, gradients=gradients)


def assert_parameters_after_good_steps(module, data, steps, balancer=None, gradients="parameters"):
    """The parameters equal those of a hand-written loop over the first ``steps`` batches only."""
    reference = make_module(tasks=make_tasks(metrics=False), balancer=balancer, gradients=gradients)
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3)
    for batch in list(DataLoader(data, batch_size=16))[:steps]:
        optimizer.zero_grad()
        reference.training_step(batch, 0).backward()
        optimizer.step()
    for a, b in zip(module.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("balancer, gradients", BALANCED_PATHS)
def test_nonfinite_loss_skip_mode_skips_the_step(balancer, gradients):
    module = make_module(tasks=make_tasks(metrics=False), nonfinite_loss="skip", balancer=balancer, gradients=gradients)
    trainer = quiet_trainer(max_epochs=1)
    with pytest.warns(UserWarning, match=r"non-finite loss for task\(s\) \['reg'\].*skipped"):
        trainer.fit(module, DataLoader(NaNAfter(64, bad=32), batch_size=16))
    # 4 batches, the last 2 skipped: no parameter moved after the 2 good steps
    assert_parameters_after_good_steps(module, NaNAfter(64, bad=32), steps=2, balancer=balancer, gradients=gradients)


def test_bad_nonfinite_option():
    with pytest.raises(ValueError, match="nonfinite_loss must be 'raise' or 'skip'"):
        make_module(nonfinite_loss="ignore")


def test_optimizer_and_scheduler_factories():
    from functools import partial

    module = make_module(
        optimizer=partial(torch.optim.SGD, lr=0.1), lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1)
    )
    config = module.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD) and config["optimizer"].param_groups[0]["lr"] == 0.1
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    default = make_module().configure_optimizers()
    assert isinstance(default, torch.optim.Adam) and default.param_groups[0]["lr"] == 1e-3


def test_checkpoint_round_trip(tmp_path):
    module = make_module()
    trainer = quiet_trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(SharedInput(32), batch_size=16))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = MultiTaskModule.load_from_checkpoint(
        path, backbone=nn.Sequential(nn.Linear(6, 8), nn.Tanh()), tasks=make_tasks(), weights_only=True
    )
    x = torch.randn(3, 6)
    for name in ("cls", "reg"):
        torch.testing.assert_close(restored(x)[name], module(x)[name])


def test_backbone_regularization_losses_are_added_after_balancing_and_logged(recording_logger):
    class Regularised(nn.Sequential):
        def regularization_losses(self):
            return {"weight_penalty": 0.5 * self[0].weight.pow(2).sum()}

    torch.manual_seed(0)
    module = MultiTaskModule(
        Regularised(nn.Linear(6, 8), nn.Tanh()), make_tasks(metrics=False, cls_weight=2.0)
    )
    data = SharedInput(16)
    loss = module.training_step((data.x, {"cls": data.cls, "reg": data.reg}), 0)
    out = module(data.x)
    expected = (
        2.0 * nn.functional.cross_entropy(out["cls"], data.cls)
        + nn.functional.mse_loss(out["reg"], data.reg)
        + 0.5 * module.backbone[0].weight.pow(2).sum()
    )
    torch.testing.assert_close(loss, expected)
    quiet_trainer(logger=recording_logger, log_every_n_steps=1).fit(module, DataLoader(data, batch_size=8))
    assert "train/weight_penalty" in recording_logger.keys


def test_architecture_built_for_other_tasks_is_refused():
    from lightning_mtl.architectures import MMoE

    backbone = MMoE(in_features=6, expert_features=8, num_experts=2, tasks=["cls", "depth"])
    with pytest.raises(ValueError, match=r"\['reg'\]"):
        MultiTaskModule(backbone, make_tasks(metrics=False))


def test_a_task_with_no_label_in_the_epoch_is_reported_as_never_trained():
    data = SharedInput(64, missing_reg=range(64))  # the reg task is in every batch, never labelled
    module = make_module(tasks=make_tasks(metrics=False))
    with pytest.warns(UserWarning, match=r"task\(s\) \['reg'\]: no training batch of the epoch had labels"):
        quiet_trainer(max_epochs=1).fit(module, DataLoader(data, batch_size=16))
    assert module._seen_tasks == {"cls"}


def test_a_skipped_step_does_not_reach_a_stateful_loss_level_balancer():
    """nonfinite_loss='skip': DWA's loss history gets the good steps only (and RLW draws for them only)."""
    bad = SharedInput(64)
    bad.reg[5] = float("inf")  # the first of 4 batches is skipped
    module = make_module(tasks=make_tasks(metrics=False), balancer="dwa", nonfinite_loss="skip")
    with pytest.warns(UserWarning, match="skipped"):
        quiet_trainer(max_steps=4).fit(module, DataLoader(bad, batch_size=16))
    assert torch.isfinite(module.balancer.history[-1]).all()  # the epoch's mean loss, from the 3 good steps

    rlw = make_module(tasks=make_tasks(metrics=False), balancer="rlw", nonfinite_loss="skip")
    with pytest.warns(UserWarning, match="skipped"):
        quiet_trainer(max_steps=4).fit(rlw, DataLoader(bad, batch_size=16))
    reference = torch.Generator().manual_seed(rlw.balancer.seed)
    for _ in range(3):
        torch.randn(2, generator=reference)
    assert torch.equal(rlw.balancer.generator.get_state(), reference.get_state())


class CallbackMetrics(L.Callback):
    """``train/loss`` as callbacks see it at the end of each batch (what ModelCheckpoint monitors)."""

    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        value = trainer.callback_metrics.get("train/loss")
        self.values.append(None if value is None else value.item())


@pytest.mark.parametrize("gradients", ["parameters", "representation"])
def test_callbacks_see_the_current_steps_train_loss(gradients, recording_logger):
    seen = CallbackMetrics()
    module = make_module(balancer="mgda", gradients=gradients)
    quiet_trainer(max_steps=4, logger=recording_logger, log_every_n_steps=1, callbacks=[seen]).fit(
        module, DataLoader(SharedInput(64), batch_size=16)
    )
    logged = [metrics["train/loss"] for _, metrics in recording_logger.history if "train/loss" in metrics]
    assert len(logged) == 4
    assert seen.values == pytest.approx(logged)


def test_several_validation_dataloaders_are_evaluated_apart():
    module = make_module()
    first, second = SharedInput(24, seed=1), SharedInput(20, seed=2)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=0)
    results = trainer.validate(module, [DataLoader(first, batch_size=7), DataLoader(second, batch_size=6)], verbose=False)
    for index, data in enumerate((first, second)):
        with torch.no_grad():
            out = module(data.x)
        cls = nn.functional.cross_entropy(out["cls"], data.cls)
        reg = nn.functional.mse_loss(out["reg"], data.reg)
        logged = results[index]
        suffix = f"/dataloader_idx_{index}"
        assert logged[f"val/cls/loss{suffix}"] == pytest.approx(cls.item(), rel=1e-5)
        assert logged[f"val/reg/loss{suffix}"] == pytest.approx(reg.item(), rel=1e-5)
        assert logged[f"val/reg/mse{suffix}"] == pytest.approx(reg.item(), rel=1e-5)
        accuracy = (out["cls"].argmax(dim=1) == data.cls).float().mean().item()
        assert logged[f"val/cls/multiclass_accuracy{suffix}"] == pytest.approx(accuracy)
        assert logged[f"val/loss{suffix}"] == pytest.approx(cls.item() + reg.item(), rel=1e-5)
        if index == 0:  # the key a ReduceLROnPlateau from lr_scheduler monitors: the first dataloader's
            assert trainer.callback_metrics["val/loss"].item() == pytest.approx(logged[f"val/loss{suffix}"])


class InfiniteTargetsIn(Dataset):
    """SharedInput in micro-batches of 16, whose micro-batch ``bad`` has infinite regression targets."""

    def __init__(self, bad, n=64):
        self.base, self.bad = SharedInput(n), bad

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        if i // 16 == self.bad:
            y = {"cls": y["cls"], "reg": torch.tensor(float("inf"))}
        return x, y


@pytest.mark.parametrize("bad", [0, 1], ids=["first-micro-batch", "second-micro-batch"])
@pytest.mark.parametrize("balancer, gradients", [(None, "parameters"), ("dwa", "parameters"), ("mgda", "parameters"), ("mgda", "representation")])
def test_skip_under_accumulation_skips_the_whole_optimizer_step(balancer, gradients, bad):
    module = make_module(tasks=make_tasks(metrics=False), balancer=balancer, gradients=gradients, nonfinite_loss="skip",
                         optimizer=lambda p: torch.optim.SGD(p, lr=0.1))  # fmt: skip
    before = [p.detach().clone() for p in module.parameters()]
    trainer = quiet_trainer(max_steps=1, accumulate_grad_batches=2)
    with pytest.warns(UserWarning, match="skipped"):
        trainer.fit(module, DataLoader(InfiniteTargetsIn(bad), batch_size=16))
    for p, p0 in zip(module.parameters(), before):
        torch.testing.assert_close(p.detach(), p0, rtol=0, atol=0)
