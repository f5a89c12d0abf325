"""SequentialTransfer: pretrain the backbone on a source task, then freeze it or slow it down."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import quiet_trainer
from lightning_mtl import MultiTaskDataModule, MultiTaskModule, Task
from lightning_mtl.callbacks import SequentialTransfer


def task_data(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    xa, xb = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
    return {"a": TensorDataset(xa, xa[:, 0] * 2), "b": TensorDataset(xb, (xb[:, 1] > 0).long())}


def make_module(batch_norm=False, **kwargs):
    torch.manual_seed(0)
    layers = [nn.Linear(4, 8)] + ([nn.BatchNorm1d(8)] if batch_norm else []) + [nn.Tanh()]
    tasks = [
        Task("a", nn.Sequential(nn.Linear(8, 1), nn.Flatten(0)), nn.MSELoss()),
        Task("b", nn.Linear(8, 2), nn.CrossEntropyLoss()),
    ]
    return MultiTaskModule(
        nn.Sequential(*layers), tasks, optimizer=lambda params: torch.optim.Adam(params, lr=1e-2), **kwargs
    )


class Snapshots(pl.Callback):
    """Backbone and head-b weights, and the batch's tasks, before every training step."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        tasks = sorted(batch) if isinstance(batch, dict) else ["all"]
        self.rows.append((tasks, module.backbone[0].weight.detach().clone(), module.heads["b"].weight.detach().clone()))


def changes(rows, index):
    return [not torch.equal(rows[i][index], rows[i + 1][index]) for i in range(len(rows) - 1)]


def test_freezes_the_backbone_when_the_sequential_schedule_reaches_the_next_task():
    module = make_module(batch_norm=True)
    data = MultiTaskDataModule(task_data(), batch_size=8, sampling="sequential", shuffle=False)
    transfer, snapshots = SequentialTransfer(source_tasks=["a"]), Snapshots()
    quiet_trainer(max_epochs=2, callbacks=[transfer, snapshots]).fit(module, datamodule=data)
    tasks = [row[0] for row in snapshots.rows]
    assert tasks == ([["a"]] * 4 + [["b"]] * 4) * 2  # all of a, then all of b, every epoch
    assert transfer.switched and transfer.switch_step == 4
    backbone_moved = changes(snapshots.rows, 1)
    assert all(backbone_moved[:4]) and not any(backbone_moved[4:])  # learns on a, frozen from b's first step
    assert any(changes(snapshots.rows, 2)[4:])  # the head of b keeps learning
    assert not any(p.requires_grad for p in module.backbone.parameters())
    assert not module.backbone.training and module.heads.training  # frozen BatchNorm statistics
    running_mean = module.backbone[1].running_mean.clone()
    quiet_trainer(max_epochs=3, callbacks=[transfer]).fit(module, datamodule=data)
    torch.testing.assert_close(module.backbone[1].running_mean, running_mean)


def test_scale_lr_moves_the_backbone_to_its_own_group_keeping_adam_state_and_schedulers():
    module = make_module()
    module.lr_scheduler_factory = lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    data = MultiTaskDataModule(task_data(), val=task_data(1), batch_size=8, sampling="round_robin")
    transfer = SequentialTransfer(at_epoch=1, mode="scale_lr", lr_scale=0.1)

    class Check(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            optimizer = trainer.optimizers[0]
            if trainer.current_epoch == 1:
                backbone = {id(p) for p in pl_module.backbone.parameters()}
                assert len(optimizer.param_groups) == 2
                moved = optimizer.param_groups[1]
                assert {id(p) for p in moved["params"]} == backbone
                assert not backbone & {id(p) for p in optimizer.param_groups[0]["params"]}
                assert moved["lr"] == pytest.approx(0.1 * optimizer.param_groups[0]["lr"])
                assert all(optimizer.state[p]["step"] > 0 for p in moved["params"])  # Adam moments kept

    trainer = quiet_trainer(max_epochs=3, callbacks=[transfer, Check()])
    trainer.fit(module, datamodule=data)
    optimizer = trainer.optimizers[0]
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert len(scheduler.base_lrs) == 2 and scheduler.base_lrs[1] == pytest.approx(1e-3)
    # after 3 epochs of StepLR(gamma=0.5) both groups were halved 3 times
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(1e-3 / 8)


def test_resume_after_the_switch_restores_the_split_optimizer(tmp_path):
    data = MultiTaskDataModule(task_data(), batch_size=8, sampling="round_robin")
    module = make_module()
    trainer = quiet_trainer(
        max_epochs=2, callbacks=[SequentialTransfer(at_step=3, mode="scale_lr")], default_root_dir=tmp_path, enable_checkpointing=True
    )
    trainer.fit(module, datamodule=data)
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    resumed = SequentialTransfer(at_step=3, mode="scale_lr")
    trainer = quiet_trainer(max_epochs=3, callbacks=[resumed])
    trainer.fit(make_module(), datamodule=data, ckpt_path=checkpoint)  # would fail to load 2 groups into 1
    assert resumed.switched and resumed.switch_step == 3
    assert len(trainer.optimizers[0].param_groups) == 2


@pytest.mark.parametrize("balancer, gradients", [(None, "parameters"), ("upgrad", "parameters"), ("mgda", "representation")])
def test_freeze_at_step_on_shared_input_batches(balancer, gradients):
    """Also with a gradient balancer: balanced until the switch, then the heads train on their plain losses."""
    x = torch.randn(40, 4)
    loader = DataLoader(TensorDataset(x), batch_size=8, collate_fn=lambda items: (
        torch.stack([i[0] for i in items]), {"a": torch.stack([i[0][0] for i in items]), "b": (torch.stack([i[0][1] for i in items]) > 0).long()}
    ))  # fmt: skip
    module, snapshots = make_module(balancer=balancer, gradients=gradients), Snapshots()
    quiet_trainer(max_epochs=1, callbacks=[SequentialTransfer(at_step=2), snapshots]).fit(module, loader)
    assert changes(snapshots.rows, 1) == [True, True, False, False]  # steps 0 and 1 train it, 2 on do not
    assert all(changes(snapshots.rows, 2))  # the head of b learns at every step, before and after


def test_source_tasks_need_per_task_batches():
    x = torch.randn(16, 4)
    loader = DataLoader(TensorDataset(x), batch_size=8, collate_fn=lambda items: (
        torch.stack([i[0] for i in items]), {"a": torch.stack([i[0][0] for i in items]), "b": torch.zeros(len(items), dtype=torch.long)}
    ))  # fmt: skip
    with pytest.raises(ValueError, match=r"needs per-task batches .* Use at_epoch or at_step instead"):
        quiet_trainer(callbacks=[SequentialTransfer(source_tasks=["a"])]).fit(make_module(), loader)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "give exactly one of `source_tasks`, `at_epoch`, `at_step`; got none"),
        ({"at_epoch": 1, "at_step": 3}, r"got \['at_epoch', 'at_step'\]"),
        ({"at_epoch": -1}, "`at_epoch` must be an int >= 0"),
        ({"source_tasks": "a"}, "`source_tasks` must be a non-empty list"),
        ({"at_step": 1, "mode": "thaw"}, "`mode` must be 'freeze' or 'scale_lr'"),
        ({"at_step": 1, "lr_scale": 0}, "`lr_scale` must be a number > 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SequentialTransfer(**kwargs)


def test_unknown_source_task_and_module_are_refused_at_setup():
    data = MultiTaskDataModule(task_data(), batch_size=8, sampling="sequential")
    with pytest.raises(ValueError, match=r"`source_tasks` has task\(s\) \['c'\] that the model lacks"):
        quiet_trainer(callbacks=[SequentialTransfer(source_tasks=["c"])]).fit(make_module(), datamodule=data)
    with pytest.raises(ValueError, match="`module='trunk'` must name an nn.Module attribute"):
        quiet_trainer(callbacks=[SequentialTransfer(at_epoch=1, module="trunk")]).fit(make_module(), datamodule=data)


def test_freeze_under_plain_ddp_is_refused_with_the_fix():
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    with pytest.raises(ValueError, match="ddp_find_unused_parameters_true"):
        SequentialTransfer(at_epoch=1).setup(trainer, make_module(), "fit")


@pytest.mark.parametrize(
    "scheduler",
    [
        lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch),
        lambda optimizer: torch.optim.lr_scheduler.MultiplicativeLR(optimizer, lambda epoch: 0.5),
    ],
    ids=["LambdaLR", "MultiplicativeLR"],
)
def test_scale_lr_splits_schedulers_with_per_group_lambdas(scheduler):
    module = make_module()
    module.lr_scheduler_factory = scheduler
    data = MultiTaskDataModule(task_data(), batch_size=8, sampling="round_robin")
    trainer = quiet_trainer(max_epochs=3, callbacks=[SequentialTransfer(at_epoch=1, mode="scale_lr", lr_scale=0.1)])
    trainer.fit(module, datamodule=data)
    groups = trainer.optimizers[0].param_groups
    assert groups[0]["lr"] == pytest.approx(1e-2 / 8) and groups[1]["lr"] == pytest.approx(1e-3 / 8)


def test_scale_lr_splits_a_cyclic_schedule():
    module = make_module()
    module.optimizer_factory = lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    module.lr_scheduler_factory = lambda optimizer: torch.optim.lr_scheduler.CyclicLR(
        optimizer, base_lr=1e-3, max_lr=1e-2, step_size_up=2
    )  # stepped once per epoch: the switch (step 3) comes before the first step of the split schedule
    data = MultiTaskDataModule(task_data(), batch_size=8, sampling="round_robin")
    trainer = quiet_trainer(max_epochs=2, callbacks=[SequentialTransfer(at_step=3, mode="scale_lr", lr_scale=0.1)])
    trainer.fit(module, datamodule=data)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == pytest.approx([1e-3, 1e-4]) and scheduler.max_lrs == pytest.approx([1e-2, 1e-3])
    groups = trainer.optimizers[0].param_groups
    assert groups[1]["lr"] == pytest.approx(0.1 * groups[0]["lr"])


def test_a_reused_callback_applies_its_switch_again_in_the_next_fit():
    data = MultiTaskDataModule(task_data(), batch_size=8, sampling="round_robin")
    transfer = SequentialTransfer(at_epoch=1, mode="scale_lr", lr_scale=0.1)
    quiet_trainer(max_epochs=2, callbacks=[transfer]).fit(make_module(), datamodule=data)
    assert transfer.switched
    trainer = quiet_trainer(max_epochs=1, callbacks=[transfer])
    trainer.fit(make_module(), datamodule=data)  # a new module and optimizer: the switch holds from the start
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(1e-3)
