"""Shared test helpers: a quiet CPU Trainer and a logger that records every logged value."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
from lightning.pytorch.loggers import Logger

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


class RecordingLogger(Logger):
    """Keeps ``(step, {key: value})`` for every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.history.append((step, dict(metrics)))

    @property
    def keys(self) -> set[str]:
        return {key for _, metrics in self.history for key in metrics}


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


@pytest.fixture
def recording_logger() -> RecordingLogger:
    return RecordingLogger()


def run_script(script, *args, timeout: float = 240):
    """Run ``python script args`` in its own process group; kill the group on timeout (a hung rank).

    Returns ``(returncode, output)``. Used for 2-process DDP runs: under pytest ``strategy="ddp"`` would
    re-launch pytest itself for rank 1, so DDP tests launch a plain script instead.
    """
    import os
    import signal
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{script} did not finish in {timeout} s (a rank hung?):\n{output.decode()[-4000:]}")
    return process.returncode, output.decode()


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B without network or home-directory writes; the working directory is ``tmp_path/cwd``."""
    wandb = pytest.importorskip("wandb")
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb-dir"), "WANDB_SILENT": "true",
                       "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                       "WANDB_DISABLE_GIT": "true"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    (tmp_path / "wandb-dir").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    yield tmp_path
    wandb.finish()
