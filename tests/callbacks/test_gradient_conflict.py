"""`GradientConflict`: the logged cosines and norms equal those of per-task gradients computed by hand."""

import copy
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from _ddp_gradient_conflict_fit import CASES, STEPS, ThreeTasks, build, global_loader, rank_loader
from conftest import RecordingLogger, quiet_trainer, run_script
from lightning_mtl.callbacks import GradientConflict
from lightning_mtl.callbacks.gradient_conflict import conflict_statistics, gradient_cosines

TASKS = ("cls", "reg", "neg")
SCRIPT = Path(__file__).with_name("_ddp_gradient_conflict_fit.py")


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # pictures of runs without a logger go to the working directory


def three_task_module(balancer=None, gradients="parameters"):
    return build(balancer, gradients)


def hand_cosines(module, batch, mode):
    """(cosines, norms) of the task gradients by one autograd call per task (shared parameters or backbone output)."""
    x, labels = batch
    z = module.backbone(x)
    losses = [
        F.cross_entropy(module.heads["cls"](z), labels["cls"]),
        F.mse_loss(module.heads["reg"](z), labels["reg"]),
        F.mse_loss(module.heads["neg"](z), labels["neg"]),
    ]
    inputs = list(module.backbone.parameters()) if mode == "parameters" else [z]
    rows = [torch.cat([g.flatten() for g in torch.autograd.grad(loss, inputs, retain_graph=True)]) for loss in losses]
    jacobian = torch.stack(rows).double()
    norms = jacobian.norm(dim=1)
    return (jacobian @ jacobian.T) / torch.outer(norms, norms), norms


class Snapshot(L.Callback):
    """Copies of the module and the batch at the start of every ``every``-th step's first micro-batch."""

    def __init__(self, every):
        self.every, self.seen = every, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if step % self.every == 0 and step not in self.seen:
            self.seen[step] = (copy.deepcopy(pl_module), batch)


def test_cosines_and_statistics_of_a_hand_made_gramian():
    # gradients g0 = (1, 0), g1 = (-1, 1), g2 = (3, 0), g3 = 0 (a task without labels)
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [3.0, 0.0], [0.0, 0.0]])
    cosines, norms = gradient_cosines(g @ g.T)
    torch.testing.assert_close(norms, torch.tensor([1.0, math.sqrt(2), 3.0, 0.0], dtype=torch.float64))
    expected = torch.tensor([[1.0, -1 / math.sqrt(2), 1.0], [-1 / math.sqrt(2), 1.0, -1 / math.sqrt(2)], [1.0, -1 / math.sqrt(2), 1.0]])
    torch.testing.assert_close(cosines[:3, :3], expected.double())
    assert cosines[3].isnan().all() and cosines[:, 3].isnan().all()
    stats = conflict_statistics(cosines, norms)
    assert stats["conflict_fraction"] == pytest.approx(2 / 3)  # pairs (0,1), (1,2) conflict; (0,2) agrees
    assert stats["mean_cosine"] == pytest.approx((1 - 2 / math.sqrt(2)) / 3)
    assert stats["norm_ratio"] == pytest.approx(3.0)  # the zero norm is left out
    assert conflict_statistics(*gradient_cosines(torch.tensor([[4.0]]))) == {}  # one task: nothing to compare


@pytest.mark.parametrize(
    "balancer, mode", [("static", "parameters"), ("static", "representation"), ("upgrad", "parameters"), ("mgda", "representation")]
)
def test_logged_values_equal_cosines_of_per_task_gradients_computed_by_hand(tmp_path, balancer, mode):
    module = three_task_module(balancer, mode)
    logger, snapshot = RecordingLogger(), Snapshot(every=2)
    conflict = GradientConflict(every_n_steps=2)
    trainer = quiet_trainer(max_epochs=1, callbacks=[snapshot, conflict], logger=logger, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(ThreeTasks(96), batch_size=16))  # 6 steps: samples at 0, 2, 4

    logged = {step: metrics for step, metrics in logger.history if "train/gradients/mean_cosine" in metrics}
    assert sorted(logged) == sorted(snapshot.seen) == [0, 2, 4]
    references = []
    for step, (copy_, batch) in snapshot.seen.items():
        cosines, norms = hand_cosines(copy_, batch, mode)
        references.append(cosines)
        pairs = cosines[torch.triu_indices(3, 3, 1).unbind()]
        metrics = logged[step]
        assert metrics["train/gradients/mean_cosine"] == pytest.approx(float(pairs.mean()), abs=1e-5)
        assert metrics["train/gradients/conflict_fraction"] == pytest.approx(float((pairs < 0).double().mean()))
        assert metrics["train/gradients/norm_ratio"] == pytest.approx(float(norms.max() / norms.min()), rel=1e-4)
        for task, norm in zip(TASKS, norms):
            assert metrics[f"train/{task}/grad_norm"] == pytest.approx(float(norm), rel=1e-4)
    assert 0 < logged[0]["train/gradients/conflict_fraction"] < 1  # reg and neg conflict, not every pair

    # the epoch's heatmap: the mean of the sampled matrices, as PNG + JSON in the run's log dir (here a recording
    # logger without a directory: the trainer's root dir), logged at the step after the epoch's last
    folder = Path(tmp_path) / "figures" / "train" / "gradients" / "cosine"
    assert sorted(p.name for p in folder.iterdir()) == ["step_000006.json", "step_000006.png"]
    data = json.loads((folder / "step_000006.json").read_text())
    assert data["task_names"] == list(TASKS) and data["steps"] == [0, 2, 4] and data["samples"] == 3
    torch.testing.assert_close(torch.tensor(data["cosine"], dtype=torch.float64), torch.stack(references).mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(conflict.cosines, references[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("every_n_epochs, drawn", [(0, {6: [0, 2, 4]}), (2, {6: [0, 2, 4]}), (1, {3: [0, 2], 6: [4]})])
def test_heatmap_every_n_epochs_averages_the_samples_since_the_last_picture(tmp_path, every_n_epochs, drawn):
    conflict = GradientConflict(every_n_steps=2, every_n_epochs=every_n_epochs)
    quiet_trainer(max_epochs=2, callbacks=[conflict], default_root_dir=tmp_path).fit(
        three_task_module(), DataLoader(ThreeTasks(48), batch_size=16)
    )  # 2 epochs of 3 steps; logger steps at the epoch ends: 3 and 6
    folder = Path(tmp_path) / "figures" / "train" / "gradients" / "cosine"
    found = {int(p.stem[5:]): json.loads(p.read_text())["steps"] for p in folder.glob("*.json")}
    assert found == drawn


class GramianRecorder(L.Callback):
    def __init__(self):
        self.gramians = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.gramians.append(pl_module.last_step.gramian)


def parameters(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_static_weights_get_the_gramian_on_sampled_steps_only_and_the_same_update():
    recorder = GramianRecorder()
    watched = three_task_module()
    quiet_trainer(max_epochs=1, callbacks=[GradientConflict(every_n_steps=3, heatmap=False), recorder]).fit(
        watched, DataLoader(ThreeTasks(96), batch_size=16)
    )
    assert [g is not None for g in recorder.gramians] == [True, False, False, True, False, False]
    plain = three_task_module()
    quiet_trainer(max_epochs=1).fit(plain, DataLoader(ThreeTasks(96), batch_size=16))
    assert torch.equal(parameters(watched), parameters(plain))


def test_under_accumulation_the_first_micro_batch_of_a_sampled_step_is_read():
    logger, snapshot = RecordingLogger(), Snapshot(every=2)
    trainer = quiet_trainer(
        max_epochs=1, accumulate_grad_batches=2, logger=logger, callbacks=[snapshot, GradientConflict(every_n_steps=2, heatmap=False)]
    )
    trainer.fit(three_task_module(), DataLoader(ThreeTasks(128), batch_size=16))  # 8 batches, 4 steps
    logged = {step: m for step, m in logger.history if "train/gradients/mean_cosine" in m}
    assert sorted(logged) == [0, 2]
    for step in (0, 2):
        copy_, batch = snapshot.seen[step]
        _, norms = hand_cosines(copy_, batch, "parameters")
        assert logged[step]["train/reg/grad_norm"] == pytest.approx(float(norms[1]), rel=1e-4)


def test_a_frozen_backbone_has_nothing_to_compare_and_says_so_once():
    module = three_task_module()
    module.backbone.requires_grad_(False)
    logger = RecordingLogger()
    with pytest.warns(UserWarning, match="formed no task gradients"):
        quiet_trainer(max_epochs=1, logger=logger, callbacks=[GradientConflict(every_n_steps=1)]).fit(
            module, DataLoader(ThreeTasks(48), batch_size=16)
        )
    assert "train/gradients/mean_cosine" not in logger.keys


def test_arguments_model_and_sampling_are_checked():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="every_n_steps"):
            GradientConflict(every_n_steps=bad)
    with pytest.raises(ValueError, match="every_n_epochs"):
        GradientConflict(every_n_epochs=-1)
    assert GradientConflict().every_n_steps == 100  # the interval benchmarks/diagnostics.py measured

    class Plain(L.LightningModule):
        pass

    with pytest.raises(ValueError, match="MultiTaskModule"):
        GradientConflict().setup(quiet_trainer(), Plain(), "fit")

    class OneTaskPerStep(L.LightningDataModule):
        sampling, task_names = "round_robin", list(TASKS)

    trainer = quiet_trainer()
    trainer.datamodule = OneTaskPerStep()
    with pytest.raises(ValueError, match="sampling='round_robin' holds one task per step"):
        GradientConflict().setup(trainer, three_task_module(), "fit")


def test_the_docs_headings_state_each_diagnostic_callbacks_arguments_and_defaults():
    import ast
    import inspect
    import re

    from lightning_mtl import callbacks

    text = (Path(__file__).resolve().parents[2] / "docs" / "diagnostics.md").read_text()
    headings = dict(re.findall(r"^## `(\w+)\((.*)\)`$", text, flags=re.M))
    assert set(headings) == {"GradientConflict", "TaskWeights", "TaskAffinity"}
    for name, arguments in headings.items():
        documented = {key: ast.literal_eval(value) for key, value in (a.split("=", 1) for a in arguments.split(", "))}
        actual = {key: p.default for key, p in inspect.signature(getattr(callbacks, name)).parameters.items()}
        assert documented == actual, name


def test_state_dict_keeps_the_epochs_samples():
    conflict = GradientConflict(every_n_steps=1, heatmap=True)
    quiet_trainer(max_steps=2, callbacks=[conflict]).fit(three_task_module(), DataLoader(ThreeTasks(96), batch_size=16))
    conflict._sum, conflict._count, conflict._steps = torch.ones(3, 3), torch.ones(3, 3) * 2, [0, 1]
    restored = GradientConflict()
    restored.load_state_dict(copy.deepcopy(conflict.state_dict()))
    assert restored._steps == [0, 1] and torch.equal(restored._sum / restored._count, torch.full((3, 3), 0.5))
    assert restored._task_names == TASKS


@pytest.mark.slow
def test_under_two_ddp_processes_the_values_are_the_global_batch_ones_on_both(tmp_path):
    returncode, output = run_script(SCRIPT, tmp_path, "conflict", timeout=300)
    assert returncode == 0, output[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["logged_steps"] == list(range(STEPS)) and ranks[1]["logged_steps"] == []  # rank zero logs
    for balancer, mode in CASES:
        key = f"{balancer}/{mode}"
        snapshot = Snapshot(every=1)
        quiet_trainer(max_steps=STEPS, callbacks=[snapshot]).fit(build(balancer, mode), global_loader())
        for step in range(STEPS):
            expected, expected_norms = hand_cosines(*snapshot.seen[step], mode)  # one process, the global batch
            for rank, result in enumerate(ranks):
                cosines = torch.tensor(result[key]["cosines"][step], dtype=torch.float64)
                norms = torch.tensor(result[key]["norms"][step], dtype=torch.float64)
                torch.testing.assert_close(cosines, expected, atol=1e-5, rtol=0, msg=f"{key} rank {rank} step {step}")
                torch.testing.assert_close(norms, expected_norms, rtol=1e-4, atol=1e-7, msg=f"{key} rank {rank} step {step}")
        # not vacuous: a rank's half of the first global batch alone gives other cosines
        half = next(iter(rank_loader(0, 2)))
        local, _ = hand_cosines(build(balancer, mode), half, mode)
        assert (local - hand_cosines(*snapshot.seen[0], mode)[0]).abs().max() > 1e-3
