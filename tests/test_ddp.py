"""The real MultiTaskModule with MultiTaskDataModule across 2 DDP processes (CPU, gloo)."""

import json
from pathlib import Path

import pytest

from conftest import run_script

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("_ddp_module_fit.py")


def fit(tmp_path, sampling, strategy):
    returncode, output = run_script(SCRIPT, tmp_path, sampling, strategy)
    assert returncode == 0, output[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize(
    "sampling, strategy, steps",
    [("zip", "ddp", 7), ("round_robin", "ddp_find_unused_parameters_true", 12)],
)
def test_ddp_fit_keeps_ranks_identical(tmp_path, sampling, strategy, steps):
    rank0, rank1 = fit(tmp_path, sampling, strategy)
    # same task(s) at each step on both ranks; uneven data (37 vs 101 samples) did not hang
    assert rank0["tasks"] == rank1["tasks"] and len(rank0["tasks"]) == 2 * steps
    if sampling == "zip":
        assert all(tasks == ["a", "b"] for tasks in rank0["tasks"])
    else:
        assert all(len(tasks) == 1 for tasks in rank0["tasks"])
    # gradients were all-reduced: both replicas hold the same weights after training
    assert rank0["parameters"] == pytest.approx(rank1["parameters"], abs=1e-7)
    # validation metrics are synced across processes at epoch end
    assert set(rank0["val"]) == {"val/loss", "val/a/loss", "val/a/acc", "val/b/loss"}
    assert rank0["val"] == pytest.approx(rank1["val"], rel=1e-6)


def test_single_task_sampling_under_plain_ddp_is_refused_with_the_fix(tmp_path):
    returncode, output = run_script(SCRIPT, tmp_path, "round_robin", "ddp")
    assert returncode != 0
    assert "sampling='round_robin' trains one task per step" in output
    assert "ddp_find_unused_parameters_true" in output


MISSING_LABELS = Path(__file__).with_name("_ddp_missing_labels_fit.py")


@pytest.mark.parametrize(
    "balancer, gradients",
    [("none", "parameters"), ("uw", "parameters"), ("famo", "parameters"), ("mgda", "parameters"),
     ("graddrop", "parameters"), ("mgda", "representation"), ("upgrad", "representation")],
)
def test_plain_ddp_survives_a_rank_without_labels_of_a_task(tmp_path, balancer, gradients):
    """Rank 0 never has a label of task b and its first batch none at all: plain DDP must not fail on the
    unused head (or UW parameter), nor hang on the empty step, and the replicas stay identical. In
    representation mode the Gramian's all-reduce runs inside the backward, among one DDP bucket
    all-reduce per parameter, whose order differs between the ranks."""
    returncode, output = run_script(MISSING_LABELS, tmp_path, balancer, gradients)
    assert returncode == 0, output[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["steps"] == rank1["steps"] == 8  # 32 samples per rank, batch 8, 2 epochs
    # every rank ran every backward: a rank that skips one leaves the others' all-reduce unmatched
    assert rank0["backwards"] == rank1["backwards"] == 8
    assert rank0["parameters"] == pytest.approx(rank1["parameters"], abs=1e-7)
    assert all(abs(p) < 1e3 for p in rank0["parameters"])
    # the metrics of b, which rank 0 never updates, are computed on both ranks alike (no hang), over rank 1's labels
    for key in ("val/b/mae", "val/b/loss", "val/a/acc", "val/loss", "train/b/mae", "train/a/acc"):
        assert rank0["metrics"][key] == pytest.approx(rank1["metrics"][key]), key


NONFINITE = Path(__file__).with_name("_ddp_nonfinite_fit.py")


def test_skip_of_a_non_finite_value_on_one_process_skips_the_step_on_both(tmp_path):
    """nonfinite_loss='skip' under DDP: Lightning refuses None from training_step there, so the module skips
    the optimizer step itself; both processes skip it and end as if the bad step had not been there."""
    from _ddp_nonfinite_fit import CASES

    returncode, output = run_script(NONFINITE, tmp_path, timeout=400)
    assert returncode == 0, output[-4000:]
    for kind, balancer, mode in CASES:
        case = f"{kind}-{balancer}-{mode}"
        runs = {
            (variant, rank): json.loads((tmp_path / f"{case}.{variant}.rank{rank}.json").read_text())
            for variant in ("bad", "clean")
            for rank in (0, 1)
        }
        assert all(run["error"] is None for run in runs.values()), (case, [run["error"] for run in runs.values()])
        bad, clean = runs[("bad", 0)], runs[("clean", 0)]
        assert runs[("bad", 1)]["parameters"] == pytest.approx(bad["parameters"], abs=1e-7), case
        assert bad["parameters"] == pytest.approx(clean["parameters"], abs=1e-6), case  # the bad steps changed nothing
        for key, value in clean["state"].items():  # nor the balancer's state (DWA's loss history)
            assert bad["state"][key] == pytest.approx(value, abs=1e-6, nan_ok=True), (case, key)
        # every process reports the verdict it gathered: the task, and for a loss the rank that had it
        for rank in (0, 1):
            messages = runs[("bad", rank)]["nonfinite_warnings"]
            assert len(messages) == 2, (case, rank, messages)  # step 1 of each of the 2 epochs
            for message in messages:
                if kind == "loss":
                    assert "task(s) ['reg']" in message and "rank 1: {'reg': inf}" in message, (case, rank, message)
                else:
                    assert "non-finite task gradient for task(s) ['reg']" in message, (case, rank, message)
            assert runs[("clean", rank)]["nonfinite_warnings"] == [], case
