"""The README's Python API snippet runs as written (one epoch instead of five)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_api_snippet_trains():
    code = re.search(r"## The Python API in 20 lines\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 20
    assert "max_epochs=5" in code
    namespace: dict = {}
    exec(code.replace("max_epochs=5", "max_epochs=1, logger=False, enable_progress_bar=False"), namespace)
    model = namespace["model"]
    assert model.task_names == ["left", "right", "sum"]
    assert model.trainer.current_epoch == 1
    assert {"val/left/acc", "val/right/multiclass_accuracy", "val/sum/loss"} <= set(model.trainer.callback_metrics)
