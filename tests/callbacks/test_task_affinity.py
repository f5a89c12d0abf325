"""`TaskAffinity` (Fifty et al. 2021): the lookahead equals one computed by hand, constructed tasks give the expected
affinities, the training is left untouched, the grouping search is exact, DDP gives the global batch's values."""

import copy
import json
import math
import random
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from _ddp_gradient_conflict_fit import STEPS, ThreeTasks, build, global_loader
from conftest import quiet_trainer, run_script
from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.callbacks import TaskAffinity
from lightning_mtl.callbacks.task_affinity import lookahead_affinity
from lightning_mtl.callbacks.task_grouping import grouping_score, task_groups

SCRIPT = Path(__file__).with_name("_ddp_gradient_conflict_fit.py")


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files of runs without a logger go to the working directory


def three_losses(module, x, labels):
    z = module.backbone(x)
    return torch.stack(
        [
            F.cross_entropy(module.heads["cls"](z), labels["cls"]),
            F.mse_loss(module.heads["reg"](z), labels["reg"]),
            F.mse_loss(module.heads["neg"](z), labels["neg"]),
        ]
    )


def hand_lookahead(module, batch, lr, losses_of=three_losses):
    """Z[i, j] = 1 - L_j(after a plain SGD step of the backbone on L_i) / L_j, one copy of the model per task."""
    x, labels = batch
    base = losses_of(module, x, labels)
    after = []
    for i in range(len(base)):
        grads = torch.autograd.grad(base[i], list(module.backbone.parameters()), retain_graph=True)
        moved = copy.deepcopy(module)
        with torch.no_grad():
            for p, g in zip(moved.backbone.parameters(), grads):
                p -= lr * g
            after.append(losses_of(moved, x, labels))
    return (1 - torch.stack(after) / base.detach()).double()


def first_batch(n=32):
    data = ThreeTasks(n)
    return data.x, {"cls": data.cls, "reg": data.reg, "neg": data.neg}


def test_lookahead_equals_the_hand_computed_one():
    module, batch = build(), first_batch()
    z = lookahead_affinity(module, batch, lr=0.1)
    expected = hand_lookahead(module, batch, 0.1)
    torch.testing.assert_close(z, expected, atol=2e-6, rtol=0)
    assert z.abs().min() > 1e-4  # not vacuous


def test_per_task_inputs_are_measured_on_each_tasks_own_input():
    module = build()
    data = ThreeTasks(48)
    parts = {name: slice(16 * k, 16 * (k + 1)) for k, name in enumerate(("cls", "reg", "neg"))}
    batch = {name: (data.x[part], getattr(data, name)[part]) for name, part in parts.items()}

    def losses_of(m, x, labels):  # each task on its own input
        out = []
        for name, loss in (("cls", F.cross_entropy), ("reg", F.mse_loss), ("neg", F.mse_loss)):
            xs, ys = batch[name]
            out.append(loss(m.heads[name](m.backbone(xs)), ys))
        return torch.stack(out)

    expected = hand_lookahead(module, (None, None), 0.1, losses_of)
    torch.testing.assert_close(lookahead_affinity(module, batch, lr=0.1), expected, atol=2e-6, rtol=0)


class Constructed(Dataset):
    """``a`` and ``b`` are the same task; ``c`` wants the opposite of ``a``."""

    def __init__(self, n=96):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g)
        self.y = 3.0 * self.x[:, 1] + self.x[:, 2]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {"a": self.y[i], "b": self.y[i], "c": -self.y[i]}


def constructed_module():
    """One fixed readout copied to the three heads (frozen: ``c``'s head would otherwise learn to flip its sign and the
    conflict would fade); only the backbone trains."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(16, 1), nn.Flatten(0)).requires_grad_(False)
    tasks = [Task(name, copy.deepcopy(head), nn.MSELoss()) for name in "abc"]
    return MultiTaskModule(nn.Sequential(nn.Linear(6, 16), nn.Tanh()), tasks, optimizer=lambda p: torch.optim.SGD(p, lr=0.05))


def test_identical_tasks_have_the_highest_affinity_and_an_adversarial_pair_a_negative_one(tmp_path):
    affinity = TaskAffinity(every_n_steps=2, num_groups=[1, 2])
    quiet_trainer(max_epochs=2, callbacks=[affinity], default_root_dir=tmp_path).fit(
        constructed_module(), DataLoader(Constructed(), batch_size=16)
    )
    z = affinity.affinity
    assert affinity._samples == 6
    off_diagonal = z[~torch.eye(3, dtype=torch.bool)]
    assert z[0, 1] == off_diagonal.max() and z[1, 0] == off_diagonal.max() and z[0, 1] > 0
    torch.testing.assert_close(z[0, 1], z[0, 0])  # stepping on b is stepping on a
    assert z[0, 2] < 0 and z[2, 0] < 0 and z[1, 2] < 0 and z[2, 1] < 0
    groupings = affinity.groupings()
    assert groupings[2].groups == (("a", "b"), ("c",)) and groupings[2].exact
    assert groupings[2].score > 0 > groupings[1].score  # c spoils the single group
    data = json.loads((Path(tmp_path) / "task_affinity.json").read_text())
    assert data["groupings"]["2"]["groups"] == [["a", "b"], ["c"]] and data["samples"] == 6
    torch.testing.assert_close(torch.tensor(data["affinity"], dtype=torch.float64), z)


def test_default_step_size_is_the_optimizers_learning_rate_of_the_backbones_parameter_group():
    module = build()
    module.optimizer_factory = lambda params: torch.optim.SGD(
        [{"params": module.backbone.parameters(), "lr": 0.03}, {"params": module.heads.parameters()}], lr=0.2
    )
    initial, batch = copy.deepcopy(module), next(iter(DataLoader(ThreeTasks(32), batch_size=32)))
    affinity = TaskAffinity(every_n_steps=1, heatmap=False)
    quiet_trainer(max_steps=1, callbacks=[affinity]).fit(module, DataLoader(ThreeTasks(32), batch_size=32))
    torch.testing.assert_close(affinity.affinity, hand_lookahead(initial, batch, 0.03), atol=2e-6, rtol=0)
    fixed = TaskAffinity(every_n_steps=1, lr=0.5, heatmap=False)
    quiet_trainer(max_steps=1, callbacks=[fixed]).fit(copy.deepcopy(initial), DataLoader(ThreeTasks(32), batch_size=32))
    torch.testing.assert_close(fixed.affinity, hand_lookahead(initial, batch, 0.5), atol=2e-6, rtol=0)


def noisy_module():
    """A backbone with BatchNorm and Dropout: extra forwards must leave its statistics and random stream alone."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3))
    tasks = [
        Task("cls", nn.Linear(16, 2), nn.CrossEntropyLoss()),
        Task("reg", nn.Sequential(nn.Linear(16, 1), nn.Flatten(0)), nn.MSELoss()),
        Task("neg", nn.Sequential(nn.Linear(16, 1), nn.Flatten(0)), nn.MSELoss()),
    ]
    return MultiTaskModule(backbone, tasks, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


def state(module):
    return {name: value.clone() for name, value in module.state_dict().items()}


def test_training_is_unchanged_bit_for_bit_with_batchnorm_and_dropout():
    runs = []
    for callbacks in ([], [TaskAffinity(every_n_steps=2, heatmap=False)]):
        module = noisy_module()
        torch.manual_seed(123)
        quiet_trainer(max_epochs=2, callbacks=callbacks).fit(module, DataLoader(ThreeTasks(96), batch_size=16, shuffle=True))
        runs.append(state(module))
    plain, watched = runs
    assert plain.keys() == watched.keys()
    for name in plain:  # parameters, BatchNorm statistics and its batch counter
        assert torch.equal(plain[name], watched[name]), name


def test_every_forward_of_the_lookahead_draws_the_same_dropout_masks():
    module, batch = noisy_module(), first_batch()
    module.train()
    z = lookahead_affinity(module, batch, lr=0.0)  # no step: every loss after equals the loss before
    assert torch.equal(z, torch.zeros(3, 3, dtype=torch.float64))
    assert lookahead_affinity(module, batch, lr=0.1).abs().max() > 1e-4


def test_files_under_a_csv_logger_and_without_a_logger(tmp_path):
    for logger in (CSVLogger(tmp_path / "csv", name="run"), False):
        affinity = TaskAffinity(every_n_steps=2)
        trainer = quiet_trainer(max_epochs=2, callbacks=[affinity], logger=logger, default_root_dir=tmp_path / "root")
        trainer.fit(build(), DataLoader(ThreeTasks(96), batch_size=16))
        folder = Path(logger.log_dir) if logger else tmp_path / "root"
        data = json.loads((folder / "task_affinity.json").read_text())
        assert data["task_names"] == ["cls", "reg", "neg"] and data["samples"] == 6
        assert set(data["groupings"]) == {"1", "2"}  # default: 1 to K - 1 groups
        assert sorted(p.name for p in (folder / "figures" / "train" / "task_affinity").iterdir()) == [
            "step_000006.json", "step_000006.png", "step_000012.json", "step_000012.png"
        ]  # fmt: skip
        torch.testing.assert_close(torch.tensor(data["affinity"], dtype=torch.float64), affinity.affinity)


def test_every_n_epochs_zero_reports_at_the_end_of_fit_only(tmp_path):
    affinity = TaskAffinity(every_n_steps=2, every_n_epochs=0)
    quiet_trainer(max_epochs=2, callbacks=[affinity], default_root_dir=tmp_path).fit(build(), DataLoader(ThreeTasks(96), batch_size=16))
    folder = Path(tmp_path) / "figures" / "train" / "task_affinity"
    assert sorted(p.name for p in folder.iterdir()) == ["step_000012.json", "step_000012.png"]
    assert json.loads((Path(tmp_path) / "task_affinity.json").read_text())["samples"] == 6


def test_the_mean_survives_a_checkpoint():
    affinity = TaskAffinity(every_n_steps=1, heatmap=False)
    quiet_trainer(max_steps=3, callbacks=[affinity]).fit(build(), DataLoader(ThreeTasks(96), batch_size=16))
    restored = TaskAffinity()
    restored.load_state_dict(copy.deepcopy(affinity.state_dict()))
    assert restored._samples == 3 and torch.equal(restored.affinity, affinity.affinity)


def test_arguments_model_and_sampling_are_checked():
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="every_n_steps"):
            TaskAffinity(every_n_steps=bad)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lr"):
            TaskAffinity(lr=bad)
    with pytest.raises(ValueError, match="every_n_epochs"):
        TaskAffinity(every_n_epochs=-1)
    assert TaskAffinity().every_n_steps == 200  # the interval benchmarks/diagnostics.py measured
    with pytest.raises(ValueError, match="num_groups"):
        TaskAffinity(num_groups=[2, 0])
    with pytest.raises(ValueError, match="at most that many groups"):
        TaskAffinity(num_groups=4).setup(quiet_trainer(), build(), "fit")

    class Plain(L.LightningModule):
        pass

    with pytest.raises(ValueError, match="MultiTaskModule"):
        TaskAffinity().setup(quiet_trainer(), Plain(), "fit")

    class OneTaskPerStep(L.LightningDataModule):
        sampling, task_names = "temperature", ["cls", "reg", "neg"]

    trainer = quiet_trainer()
    trainer.datamodule = OneTaskPerStep()
    with pytest.raises(ValueError, match="sampling='temperature' holds one task per step"):
        TaskAffinity().setup(trainer, build(), "fit")


# ---------------------------------------------------------------------------------------- grouping


def brute_force(z, num_groups):
    """The best score over every partition of range(K) into num_groups groups."""
    k, best = len(z), -math.inf

    def partitions(t, groups):
        nonlocal best
        if t == k:
            if len(groups) == num_groups:
                best = max(best, grouping_score(z, groups)[0])
            return
        for group in groups:
            group.append(t)
            partitions(t + 1, groups)
            group.pop()
        groups.append([t])
        partitions(t + 1, groups)
        groups.pop()

    partitions(0, [])
    return best


HAND = [  # two blocs, {0, 1} and {2, 3}, that help within and hurt across
    [9.0, 0.5, -0.3, -0.3],
    [0.5, 9.0, -0.3, -0.3],
    [-0.3, -0.3, 9.0, 0.4],
    [-0.3, -0.3, 0.4, 9.0],
]


def test_grouping_of_a_hand_made_affinity():
    names = ["a", "b", "c", "d"]
    two = task_groups(HAND, 2, names)
    assert two.groups == (("a", "b"), ("c", "d")) and two.exact
    assert two.score == pytest.approx(2 * 0.5 + 2 * 0.4)  # each task's mean affinity from its group mates
    assert two.task_scores == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.4, "d": 0.4})
    one = task_groups(HAND, 1, names)  # each task: (0.5 - 0.3 - 0.3) / 3 or (0.4 - 0.3 - 0.3) / 3
    assert one.groups == (("a", "b", "c", "d"),) and one.score == pytest.approx(2 * (-0.1 / 3) + 2 * (-0.2 / 3))
    three = task_groups(HAND, 3, names)  # keep the stronger pair, split the other (alone: 0)
    assert three.groups == (("a", "b"), ("c",), ("d",)) and three.score == pytest.approx(1.0)
    assert task_groups(HAND, 4, names).score == 0.0  # the diagonal is never used


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6, 7])
def test_grouping_is_the_best_partition_and_ignores_direction_and_order(k):
    generator = torch.Generator().manual_seed(k)
    for _ in range(3):
        z = (torch.randn(k, k, generator=generator) * 0.1 + 0.02).double()
        for g in range(1, k + 1):
            found = task_groups(z, g)
            assert found.exact and found.score == pytest.approx(brute_force(z.tolist(), g), abs=1e-12)
            assert len(found.groups) == g and sorted(int(t) for group in found.groups for t in group) == list(range(k))
            assert task_groups(z.T, g).score == pytest.approx(found.score, abs=1e-12)  # a pair scores Z_ij + Z_ji
            order = list(range(k))
            random.Random(g).shuffle(order)
            assert task_groups(z[order][:, order], g).score == pytest.approx(found.score, abs=1e-12)


def test_a_search_past_its_budget_returns_its_best_partition_and_says_so():
    z = torch.randn(9, 9, generator=torch.Generator().manual_seed(0)).double()
    with pytest.warns(UserWarning, match="not proven optimal"):
        found = task_groups(z, 4, max_nodes=10)
    assert not found.exact and len(found.groups) == 4
    assert found.score == pytest.approx(grouping_score(z, [[int(t) for t in g] for g in found.groups])[0])
    assert found.score <= task_groups(z, 4).score + 1e-12


def test_grouping_arguments_are_checked():
    with pytest.raises(ValueError, match="square"):
        task_groups([[0.0, 1.0]], 1)
    with pytest.raises(ValueError, match="between 1 and the number of tasks"):
        task_groups(HAND, 5)
    with pytest.raises(ValueError, match=r"\('a', 'b'\)\]: they were never measured together"):
        task_groups([[0.0, float("nan")], [0.1, 0.0]], 1, ["a", "b"])
    nan_diagonal = [[float("nan"), 0.2], [0.1, float("nan")]]
    assert task_groups(nan_diagonal, 1).score == pytest.approx(0.3)


def test_exact_search_of_ten_tasks_is_quick():
    import time

    z = (torch.randn(10, 10, generator=torch.Generator().manual_seed(1)) * 0.1 + 0.02).double()
    start = time.perf_counter()
    for g in range(1, 10):
        assert task_groups(z, g).exact
    assert time.perf_counter() - start < 10


# ---------------------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_under_two_ddp_processes_the_affinity_is_the_global_batch_one_on_both(tmp_path):
    returncode, output = run_script(SCRIPT, tmp_path, "affinity", timeout=300)
    assert returncode == 0, output[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    single = TaskAffinity(every_n_steps=1, heatmap=False)
    module = build()
    quiet_trainer(max_steps=STEPS, callbacks=[single]).fit(module, global_loader())
    assert single._samples == STEPS
    for rank, result in enumerate(ranks):
        assert result["samples"] == STEPS
        torch.testing.assert_close(torch.tensor(result["affinity"], dtype=torch.float64), single.affinity, atol=2e-6, rtol=0)
    plain = build()
    quiet_trainer(max_steps=STEPS).fit(plain, global_loader())  # the callback does not change the training
    expected = torch.cat([p.detach().flatten() for p in plain.parameters()])
    torch.testing.assert_close(torch.tensor(ranks[0]["parameters"]), expected, atol=1e-5, rtol=0)
    # not vacuous: the first step's affinity on one rank's half differs from the global batch's
    half = next(iter(DataLoader(ThreeTasks(2 * 16 * STEPS), batch_size=16)))
    whole = next(iter(global_loader()))
    assert (lookahead_affinity(build(), half, 0.1) - lookahead_affinity(build(), whole, 0.1)).abs().max() > 1e-3


