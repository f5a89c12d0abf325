"""Gradient balancing under 2 real DDP processes equals one process on the same global batch."""

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from _ddp_balancer_fit import CASES, PER_RANK, STEPS, build
from _ddp_famo_absent import LR as FAMO_LR
from _ddp_famo_absent import STEPS as FAMO_STEPS
from _ddp_famo_absent import TASKS as FAMO_TASKS
from conftest import quiet_trainer, run_script
from lightning_mtl.balancers import FAMO
from test_module import SharedInput

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("_ddp_balancer_fit.py")
FAMO_SCRIPT = Path(__file__).with_name("_ddp_famo_absent.py")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_balancers")
    returncode, output = run_script(SCRIPT, out, timeout=400)
    assert returncode == 0, output[-4000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("balancer, mode", CASES)
def test_two_processes_equal_one_process_on_the_global_batch(ddp_results, balancer, mode):
    module = build(balancer, mode)
    data = SharedInput(PER_RANK * 2 * STEPS)
    quiet_trainer(max_steps=STEPS).fit(module, DataLoader(data, batch_size=2 * PER_RANK, shuffle=False))
    single = torch.cat([p.detach().flatten() for p in module.parameters()])
    initial = torch.cat([p.detach().flatten() for p in build(balancer, mode).parameters()])
    distributed = torch.tensor(ddp_results[f"{balancer}/{mode}"])
    assert (single - initial).abs().max() > 1e-3  # the run moved the parameters
    torch.testing.assert_close(distributed, single, rtol=0, atol=1e-5)


def _global_losses(per_rank: list[list[float]], present: list[list[bool]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each task's loss averaged over the ranks that have it (0 where none does), and whether any does."""
    values, mask = torch.tensor(per_rank), torch.tensor(present)
    count = mask.sum(dim=0)
    return torch.where(count > 0, (values * mask).sum(dim=0) / count.clamp_min(1), 0.0), count > 0


def test_famo_with_a_task_absent_on_one_process_equals_one_process_on_the_global_losses(tmp_path):
    """A rank without labels for a task must not add its zero loss to the post-step mean (it halved it)."""
    returncode, output = run_script(FAMO_SCRIPT, tmp_path, timeout=200)
    assert returncode == 0, output[-4000:]
    distributed = json.loads((tmp_path / "results.json").read_text())
    single = FAMO(lr=FAMO_LR)
    single.setup(FAMO_TASKS)
    for step, (ranks, logits) in enumerate(zip(FAMO_STEPS, distributed)):
        before, seen = _global_losses([rank[0] for rank in ranks], [rank[2] for rank in ranks])
        after, _ = _global_losses([rank[1] for rank in ranks], [rank[2] for rank in ranks])
        single(before, seen)
        single.after_optimizer_step(after)
        torch.testing.assert_close(torch.tensor(logits), single.logits, rtol=0, atol=1e-6, msg=f"step {step}")
    assert single.logits.abs().min() > 0.05  # every task's logit moved: the comparison is not vacuous
