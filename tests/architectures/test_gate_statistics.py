"""GateStatistics: mean gate weight per expert per task, logged at epoch end, and collapse detection."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from conftest import RecordingLogger, quiet_trainer
from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.architectures import MLP, PLE, DSelectK, MMoE
from lightning_mtl.callbacks import GateStatistics, SequentialTransfer


class Pairs(Dataset):
    def __init__(self, n=40, features=10):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, features, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {"a": self.x[i, 0], "b": self.x[i, 1]}


def fit(backbone, width, lr=0.0, epochs=1, callback=None, more_callbacks=()):
    tasks = [Task(name, nn.Sequential(nn.Linear(width, 1), nn.Flatten(0)), nn.MSELoss()) for name in ("a", "b")]
    module = MultiTaskModule(backbone, tasks, optimizer=lambda params: torch.optim.SGD(params, lr=lr))
    logger = RecordingLogger()
    callbacks = [callback or GateStatistics(), *more_callbacks]
    quiet_trainer(logger=logger, max_epochs=epochs, callbacks=callbacks).fit(module, DataLoader(Pairs(), batch_size=16))
    return module, logger


def test_logs_the_epoch_mean_of_each_gate_weight_and_its_entropy():
    torch.manual_seed(0)
    backbone = MMoE(10, 4, 3, ["a", "b"])
    tasks = [Task(name, nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)), nn.MSELoss()) for name in ("a", "b")]
    module = MultiTaskModule(backbone, tasks, optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
    logger = RecordingLogger()
    trainer = quiet_trainer(logger=logger, max_epochs=2, callbacks=[GateStatistics()])
    trainer.fit(module, DataLoader(Pairs(), batch_size=16))  # 40 samples: batches of 16, 16, 8
    backbone(Pairs().x)  # lr=0: the gates did not move, so this is every sample's weight
    for task in ("a", "b"):
        expected = backbone.last_gate_weights[f"{task}/gate"].mean(dim=0)
        logged = [trainer.callback_metrics[f"train/{task}/gate/expert_{i}"] for i in range(3)]
        torch.testing.assert_close(torch.stack(logged), expected)  # sample-weighted, not a mean of batch means
        entropy = -(expected * expected.log()).sum()
        torch.testing.assert_close(trainer.callback_metrics[f"train/{task}/gate/entropy"], entropy)
    epochs = [step for step, metrics in logger.history if "train/a/gate/expert_0" in metrics]
    assert len(epochs) == 2  # once per epoch


def test_a_collapsed_gate_shows_one_expert_with_all_weight_and_zero_entropy():
    backbone = DSelectK(10, 4, 4, ["a", "b"], k=1, per_example=False)
    with torch.no_grad():
        for gate in backbone.gates.values():
            gate.z_logits.copy_(torch.tensor([[1.0, -1.0]]))  # code 10: expert 2 only
    module, logger = fit(backbone, 4)
    metrics = logger.history[-1][1]
    assert metrics["train/a/gate/expert_2"] == pytest.approx(1.0)
    assert metrics["train/a/gate/expert_0"] == 0 and metrics["train/a/gate/entropy"] == pytest.approx(0.0, abs=1e-6)


def test_ple_logs_inner_and_shared_gates_and_can_skip_entropy():
    backbone = PLE(10, 4, ["a", "b"], num_levels=2, num_shared_experts=2)
    tasks = [Task(name, nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)), nn.MSELoss()) for name in ("a", "b")]
    module = MultiTaskModule(backbone, tasks)
    trainer = quiet_trainer(callbacks=[GateStatistics(log_entropy=False)])
    trainer.fit(module, DataLoader(Pairs(), batch_size=16))
    keys = set(trainer.callback_metrics)
    assert {"train/a/gate/a_expert_0", "train/a/gate/shared_expert_1", "train/shared/gate_level0/b_expert_0"} <= keys
    assert not any(key.endswith("/entropy") for key in keys)
    shared = [float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/shared/gate_level0/")]
    assert len(shared) == 4 and math.isclose(sum(shared), 1.0, rel_tol=1e-5)


def test_a_backbone_without_gates_is_refused():
    tasks = [Task(name, nn.Linear(4, 1), nn.MSELoss()) for name in ("a", "b")]
    module = MultiTaskModule(MLP(10, [4]), tasks)
    with pytest.raises(ValueError, match=r"GateStatistics: the model's backbone \(MLP\) keeps no gate weights"):
        quiet_trainer(callbacks=[GateStatistics()]).fit(module, DataLoader(Pairs(), batch_size=16))


def test_an_architecture_with_a_task_the_model_lacks_is_refused():
    tasks = [Task(name, nn.Linear(4, 1), nn.MSELoss()) for name in ("a", "b")]
    with pytest.raises(ValueError, match=r"its task\(s\) \['extra'\] have no head"):
        MultiTaskModule(MMoE(10, 4, 2, ["a", "b", "extra"]), tasks)  # refused before any callback runs


def test_a_backbone_frozen_in_eval_mode_still_has_its_gate_loads_counted():
    """SequentialTransfer(mode='freeze') runs the backbone in eval mode while it trains: its gates still count."""
    torch.manual_seed(0)
    _, logger = fit(MMoE(10, 4, 3, ["a", "b"]), 4, epochs=2, more_callbacks=[SequentialTransfer(at_epoch=1, mode="freeze")])
    epochs = [metrics for _, metrics in logger.history if "train/a/gate/expert_0" in metrics]
    assert len(epochs) == 2
    for metrics in epochs:  # lr=0: the same loads both epochs, a distribution over the 3 experts
        loads = [metrics[f"train/a/gate/expert_{i}"] for i in range(3)]
        assert sum(loads) == pytest.approx(1.0, abs=1e-5)
        assert loads == pytest.approx([epochs[0][f"train/a/gate/expert_{i}"] for i in range(3)], abs=1e-6)
