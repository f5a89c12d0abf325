"""Gradient balancing under 2 real DDP processes equals one process on the same global batch."""

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from _ddp_balancer_fit import BALANCERS, MODES, PER_RANK, STEPS, build
from conftest import quiet_trainer, run_script
from test_module import SharedInput

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("_ddp_balancer_fit.py")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_balancers")
    returncode, output = run_script(SCRIPT, out, timeout=400)
    assert returncode == 0, output[-4000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("balancer", BALANCERS)
def test_two_processes_equal_one_process_on_the_global_batch(ddp_results, balancer, mode):
    module = build(balancer, mode)
    data = SharedInput(PER_RANK * 2 * STEPS)
    quiet_trainer(max_steps=STEPS).fit(module, DataLoader(data, batch_size=2 * PER_RANK, shuffle=False))
    single = torch.cat([p.detach().flatten() for p in module.parameters()])
    initial = torch.cat([p.detach().flatten() for p in build(balancer, mode).parameters()])
    distributed = torch.tensor(ddp_results[f"{balancer}/{mode}"])
    assert (single - initial).abs().max() > 1e-3  # the run moved the parameters
    torch.testing.assert_close(distributed, single, rtol=0, atol=1e-5)
