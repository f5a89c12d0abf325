"""Every architecture (and the two callbacks) in a 2-process CPU DDP fit: ranks end identical."""

import json
from pathlib import Path

import pytest

from conftest import run_script

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "_ddp_arch_fit.py"
NAMES = [
    "MMoE", "OMoE", "CGC", "PLE", "DSelectK", "CrossStitch", "MTAN", "SoftSharing", "RNNEncoder", "SequentialTransfer",
]  # fmt: skip


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_architectures")
    returncode, output = run_script(SCRIPT, out, timeout=400)  # one launch, all architectures in turn
    assert returncode == 0, output[-4000:]
    return {name: [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in (0, 1)] for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_ranks_end_with_identical_parameters(records, name):
    rank0, rank1 = records[name]
    # 44 samples in batches of 8 over 2 processes: 3 steps per epoch, 2 epochs
    assert rank0["steps"] == rank1["steps"] == 6
    assert rank0["parameters"] == pytest.approx(rank1["parameters"], abs=1e-6)
    assert rank0["buffers"] == pytest.approx(rank1["buffers"], abs=1e-6)  # BatchNorm statistics broadcast
    # epoch-level values synced across processes (step-level losses are each rank's own)
    synced = [key for key in rank0["train"] if "/gate" in key or key.endswith("/acc")]
    assert synced
    assert {k: rank0["train"][k] for k in synced} == pytest.approx({k: rank1["train"][k] for k in synced}, rel=1e-5)


def test_gate_statistics_are_reduced_over_ranks(records):
    for name in ("MMoE", "OMoE", "CGC", "PLE", "DSelectK"):
        train = records[name][0]["train"]
        gates = {key.rsplit("/", 1)[0] for key in train if "/gate" in key}
        assert gates, name
        for gate in gates:
            weights = [v for k, v in train.items() if k.startswith(gate + "/") and not k.endswith("/entropy")]
            assert sum(weights) == pytest.approx(1.0, abs=1e-4), (name, gate)


def test_regularizers_and_sequential_transfer_under_ddp(records):
    assert "train/soft_sharing_penalty" in records["SoftSharing"][0]["train"]
    assert "train/dselect_k_entropy" in records["DSelectK"][0]["train"]
    assert "train/dselect_k_reachability" in records["DSelectK"][0]["train"]  # 6 experts: not a power of two
    assert all(records["SequentialTransfer"][0]["frozen"]) and all(records["SequentialTransfer"][1]["frozen"])
