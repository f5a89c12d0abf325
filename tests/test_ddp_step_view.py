"""`last_step.gramian` under 2 real DDP processes: the global batch's Gramian, the same on both processes.

Gradient balancers form the Gramian anyway; Static forms it when a callback asks (``request_gramian``, on
every step here). Both must equal, on both ranks, the Gramian of one process on the whole global batch;
the request must leave the update unchanged.
"""

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from _ddp_balancer_fit import PER_RANK, STEPS
from _ddp_step_view_fit import CASES, TASK_WEIGHTS, Recorder, build, parameters
from conftest import quiet_trainer, run_script
from test_module import SharedInput

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("_ddp_step_view_fit.py")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_step_view")
    returncode, output = run_script(SCRIPT, out, timeout=300)
    assert returncode == 0, output[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def single_process_fit(balancer, mode, request, data, steps=STEPS, batch_size=2 * PER_RANK):
    """(recorded steps, final parameters) of one process on ``data`` in batches of ``batch_size``."""
    module = build(balancer, mode)
    recorder = Recorder(request=request)
    quiet_trainer(max_steps=steps, callbacks=[recorder]).fit(module, DataLoader(data, batch_size=batch_size, shuffle=False))
    return recorder.steps, torch.tensor(parameters(module))


def as_tensor(value, what):
    assert value is not None, f"{what} is None"
    return torch.tensor(value)


@pytest.mark.parametrize("balancer, mode", CASES)
def test_gramian_is_the_global_batch_gramian_on_every_process(ddp_results, balancer, mode):
    data = SharedInput(PER_RANK * 2 * STEPS)
    request = balancer == "static"
    single_steps, single_parameters = single_process_fit(balancer, mode, request, data)
    ranks = [results[f"{balancer}/{mode}"] for results in ddp_results]

    expected_order = [(i, i) for i in range(STEPS)]
    assert [(s["global_step"], s["batch_idx"]) for s in single_steps] == expected_order
    for rank, result in enumerate(ranks):
        assert [(s["global_step"], s["batch_idx"]) for s in result["steps"]] == expected_order, f"rank {rank}"

    for step, reference in enumerate(single_steps):
        gramian = as_tensor(reference["gramian"], f"single-process Gramian of step {step}")
        weights = as_tensor(reference["weights"], f"single-process weights of step {step}")
        assert gramian.shape == (2, 2) and torch.all(gramian.diagonal() > 0)
        per_rank = [as_tensor(r["steps"][step]["gramian"], f"rank {rank}'s Gramian of step {step}") for rank, r in enumerate(ranks)]
        per_rank_weights = [as_tensor(r["steps"][step]["weights"], f"rank {rank}'s weights of step {step}") for rank, r in enumerate(ranks)]
        # (1) the same on both processes
        torch.testing.assert_close(per_rank[1], per_rank[0], rtol=0, atol=1e-6, msg=f"Gramian differs between ranks at step {step}")
        torch.testing.assert_close(per_rank_weights[1], per_rank_weights[0], rtol=0, atol=1e-6, msg=f"weights differ between ranks at step {step}")
        # (2) the Gramian of one process on the whole global batch
        torch.testing.assert_close(per_rank[0], gramian, rtol=1e-4, atol=1e-6, msg=f"Gramian at step {step}")
        # (3) the weights too; Static's are the Task weights
        torch.testing.assert_close(per_rank_weights[0], weights, rtol=1e-4, atol=1e-6, msg=f"weights at step {step}")
        if balancer == "static":
            torch.testing.assert_close(per_rank_weights[0], torch.tensor(TASK_WEIGHTS["static"]), rtol=0, atol=0)

    # The comparison is not vacuous: the first step's Gramian of one half alone (same initial parameters)
    # is far from the global one, so a process reporting its local Gramian would fail (1) and (2).
    (half_step,), _ = single_process_fit(balancer, mode, request, Subset(data, range(PER_RANK)), steps=1, batch_size=PER_RANK)
    local, first = as_tensor(half_step["gramian"], "local Gramian"), as_tensor(single_steps[0]["gramian"], "Gramian")
    assert (local - first).abs().max() > 1e-2 * first.abs().max()

    distributed = torch.tensor(ranks[0]["parameters"])
    initial = torch.tensor(parameters(build(balancer, mode)))
    assert (single_parameters - initial).abs().max() > 1e-3  # the run moved the parameters
    torch.testing.assert_close(distributed, single_parameters, rtol=0, atol=1e-5)
    if request:
        # (4) the request does not change the update: 2 processes with it == 1 process without it
        unasked_steps, unasked_parameters = single_process_fit(balancer, mode, False, data)
        assert all(s["gramian"] is None for s in unasked_steps)
        torch.testing.assert_close(distributed, unasked_parameters, rtol=0, atol=1e-5)
