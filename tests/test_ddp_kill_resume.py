"""Kill-and-resume under 2-process DDP (#15): a run SIGKILLed after a checkpoint, resumed, equals the straight run.

Each case (see ``_ddp_kill_resume_fit.CASES``) is fitted three times by ``_ddp_kill_resume_fit.py``: straight to
``MAX_STEPS``; the same fit, SIGKILLed on every rank right after step ``KILL_AFTER + 1`` (the checkpoint of step
``KILL_AFTER`` is on disk, mid-epoch); and resumed in fresh processes from that run's ``last.ckpt``. A launch ends
at its SIGKILL, so the fits are chained over ``len(CASES) + 1`` launches (the next case is killed in the launch
that resumes the previous one) to keep process start-ups, most of the cost, few.
"""

import itertools
import json
import math
import signal
from pathlib import Path

import pytest
import torch

from _ddp_kill_resume_fit import CASES, KILL_AFTER, MAX_STEPS
from conftest import run_script

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("_ddp_kill_resume_fit.py")
ORDER = list(CASES)
# where the MultiTaskLoader stands in the step-KILL_AFTER checkpoint: (epoch, step within the epoch)
LOADER_POSITION = {"famo-zip": (1, 1), "dwa-temperature": (1, 2)}
TOLERANCE = 1e-6  # observed: bit-exact


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    out_dir = tmp_path_factory.mktemp("kill_resume")
    plan = [[*(f"straight:{case}" for case in ORDER), f"killed:{ORDER[0]}"]]
    plan += [[f"resume:{previous}", f"killed:{case}"] for previous, case in itertools.pairwise(ORDER)]
    plan += [[f"resume:{ORDER[-1]}"]]
    results: dict[str, dict] = {case: {} for case in ORDER}
    for items in plan:
        # a hung rank fails the run at the timeout (run_script kills the process group) instead of hanging
        returncode, output = run_script(SCRIPT, out_dir, *items, timeout=60)
        for item in items:
            phase, case = item.split(":")
            results[case][phase] = (returncode, output)
    return out_dir, results


def load(path: Path, output: str) -> dict:
    assert path.is_file(), f"{path.name} was not written:\n{output[-4000:]}"
    return json.loads(path.read_text())


def assert_states_equal(resumed: dict, straight: dict, what: str) -> None:
    assert resumed.keys() == straight.keys(), what
    for key, value in straight.items():
        if isinstance(value, list):
            assert resumed[key] == pytest.approx(value, rel=0, abs=TOLERANCE), f"{what}: {key}"
        else:
            assert resumed[key] == value, f"{what}: {key}"


@pytest.mark.parametrize("case", ORDER)
def test_resume_after_sigkill_equals_the_straight_run(launches, case: str) -> None:
    out_dir, results = launches
    balancer = CASES[case][0]
    case_dir = out_dir / case

    # the killed launch died of SIGKILL (rank 0 is the launched process), on both ranks, after the checkpoint
    returncode, output = results[case]["killed"]
    assert returncode == -signal.SIGKILL, f"rc={returncode}, expected a SIGKILL:\n{output[-4000:]}"
    for rank in (0, 1):
        assert f"rank {rank}: SIGKILL after step {KILL_AFTER + 1}" in output, output[-4000:]
    ckpts = case_dir / "killed-ckpts"
    assert not list(ckpts.glob(f"*step={KILL_AFTER + 3}.ckpt"))  # it did not go on
    checkpoint = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == KILL_AFTER
    (loader_state,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert (loader_state["epoch"], loader_state["step"]) == LOADER_POSITION[case]  # mid-epoch

    _, straight_output = results[case]["straight"]
    straight = load(case_dir / "straight.rank0.json", straight_output)
    _, resume_output = results[case]["resume"]
    resumed, resumed_rank1 = (load(case_dir / f"resume.rank{r}.json", resume_output) for r in (0, 1))

    # it started at the checkpoint's step and ran the rest of the straight run's steps, on the same batches
    assert resumed["steps"][0]["global_step"] == KILL_AFTER
    assert straight["global_step"] == resumed["global_step"] == MAX_STEPS
    assert [s["global_step"] for s in straight["steps"]] == list(range(MAX_STEPS))
    assert resumed["steps"] == straight["steps"][KILL_AFTER:]

    # and ended where the straight run did: parameters, balancer state, optimizer state
    assert resumed["parameters"] == pytest.approx(straight["parameters"], rel=0, abs=TOLERANCE)
    assert_states_equal(resumed["balancer"], straight["balancer"], "balancer state")
    assert_states_equal(resumed["optimizer"], straight["optimizer"], "optimizer state")
    assert resumed_rank1["parameters"] == resumed["parameters"]  # the replicas agree
    # the balancer state compared above is not trivial
    state = straight["balancer"]
    if balancer == "famo":
        assert state["balancer/_extra_state/optimizer/state/0/step"] == [MAX_STEPS]  # one Adam step per step
        assert max(map(abs, state["balancer/logits"])) > 1e-3  # the logits moved
    if balancer == "dwa":  # epochs 0 and 1 (across the kill) closed, and the half of epoch 2 that max_steps ends
        assert state["balancer/epochs"] == [3]
        assert all(math.isfinite(v) and v > 0 for v in state["balancer/history"])
