"""Checkpoints written by an older commit load, and resume, with the current code (the checkpoint format is frozen).

The files in ``tests/fixtures/checkpoints_9817c80/`` were written by commit 9817c80 with
``tests/fixtures/make_checkpoints.py`` (see its docstring), from the tiny models of
``tests/fixtures/checkpoint_models.py``, which this test builds the same way. For every stored case:

(a) ``MultiTaskModule.load_from_checkpoint(..., strict=True)`` loads it and the module's ``state_dict()``
    equals the stored one exactly (same keys, dtypes, shapes and values, balancer extra state included),
    and the parameters come in the same order (the optimizer state in a checkpoint is positional);
(b) ``trainer.fit(model, ckpt_path=...)`` resumes it for one more epoch (4 steps) and ends where the
    old code ended: the task losses before each resumed step and the whole final ``state_dict`` (parameters,
    buffers, balancer extra state: FAMO's and GradNorm's private Adam, DWA's history, RLW's and GradVac's
    generators...) agree with those stored by the old code to 1e-6.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))

import checkpoint_models as cm  # noqa: E402
from lightning_mtl import MultiTaskModule  # noqa: E402

STORE = FIXTURES / "checkpoints_9817c80"
MANIFEST = json.loads((STORE / "manifest.json").read_text())
TOLERANCE = 1e-6

# the tiny models have a validation_step and no validation data
pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


@pytest.fixture(autouse=True)
def _restore_determinism():
    """``Trainer(deterministic=True)`` switches torch's deterministic mode on for the whole process: restore it."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def _weights_only(function) -> dict:
    """``weights_only=True`` where this Lightning takes it: the checkpoint must load without unpickling code."""
    return {"weights_only": True} if "weights_only" in inspect.signature(function).parameters else {}


def test_every_case_is_stored():
    assert MANIFEST["commit"] == "9817c80"
    assert sorted(MANIFEST["cases"]) == sorted(name for name, _, _ in cm.CASES)
    for name, case in MANIFEST["cases"].items():
        for file, digest in ((case["checkpoint"], case["checkpoint_sha256"]), (case["resumed_state"], case["resumed_state_sha256"])):
            assert hashlib.sha256((STORE / file).read_bytes()).hexdigest() == digest, f"{file} differs from the one stored"


@pytest.mark.parametrize("name", sorted(MANIFEST["cases"]))
def test_checkpoint_loads_with_the_same_state(name):
    case = MANIFEST["cases"][name]
    path = STORE / case["checkpoint"]
    stored = torch.load(path, map_location="cpu", weights_only=True)
    assert stored["global_step"] == case["global_step"]
    model = MultiTaskModule.load_from_checkpoint(
        path,
        map_location="cpu",
        strict=True,
        **_weights_only(MultiTaskModule.load_from_checkpoint),
        **cm.model_kwargs(case["balancer"], case["gradients"]),
    )
    cm.assert_same_state(model.state_dict(), stored["state_dict"])
    assert [key for key, _ in model.named_parameters()] == case["parameter_names"], (
        "the parameters come in another order: the optimizer state stored in a checkpoint (indexed by position) "
        "would be restored onto the wrong parameters"
    )


@pytest.mark.parametrize("name", sorted(MANIFEST["cases"]))
def test_resume_continues_like_the_old_code(name):
    case = MANIFEST["cases"][name]
    model = cm.build_model(case["balancer"], case["gradients"])
    recorder = cm.TaskLossRecorder()
    trainer = cm.trainer(MANIFEST["epochs_after"], (recorder,))
    trainer.fit(
        model, datamodule=cm.datamodule(), ckpt_path=STORE / case["checkpoint"], **_weights_only(trainer.fit)
    )
    assert trainer.global_step == case["resumed_global_step"]

    expected_losses = case["resumed_task_losses"]["before_each_step"]
    assert len(recorder.losses) == len(expected_losses)
    torch.testing.assert_close(
        torch.tensor(recorder.losses, dtype=torch.float64),
        torch.tensor(expected_losses, dtype=torch.float64),
        rtol=TOLERANCE,
        atol=TOLERANCE,
        msg=lambda m: f"task losses before each resumed step ({case['resumed_task_losses']['tasks']}): {m}",
    )
    expected = torch.load(STORE / case["resumed_state"], map_location="cpu", weights_only=True)
    cm.assert_same_state(model.state_dict(), expected, atol=TOLERANCE)
