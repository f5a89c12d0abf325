"""The architecture examples in a reduced form: the MMoE reproduction, the MultiDigits comparison, the LSTM config."""

import importlib.util
import statistics
from pathlib import Path

import pytest

from lightning_mtl.architectures import RNNEncoder
from lightning_mtl.cli import run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mmoe_beats_shared_bottom_and_omoe_on_weakly_correlated_tasks():
    """Ma et al. (2018), Fig. 4, reduced: p = 0.5, four task pairs, 5 of the example's 10 epochs.

    The paper's sizes and the example's protocol otherwise; the assertion is on the measured mean test
    losses, so it fails if MMoE stops beating either baseline on these task pairs.
    """
    results = load_example("mmoe_synthetic").main(["--seeds", "4", "--epochs", "5", "--correlations", "0.5"])
    losses = results[0.5]
    assert {model: len(values) for model, values in losses.items()} == {"Shared-Bottom": 4, "OMoE": 4, "MMoE": 4}
    mmoe = statistics.fmean(losses["MMoE"])
    assert mmoe < statistics.fmean(losses["Shared-Bottom"])
    assert mmoe < statistics.fmean(losses["OMoE"])


def test_compare_architectures_reports_accuracy_and_parameter_counts():
    # 2 epochs of 2,000 images left hard sharing at chance for some sample orders (seeds 0 and 5 of the resumable
    # order): 3 epochs is past that early phase for every architecture.
    rows = load_example("compare_architectures").main(["--epochs", "3", "--train-size", "2000", "--test-size", "400"])
    by_name = {row["architecture"]: row for row in rows}
    assert list(by_name) == ["hard sharing", "MMoE", "cross-stitch", "MTAN"]
    hard, mmoe, stitch, mtan = by_name.values()
    assert stitch["parameters"]["shared"] == 0  # one column per task
    assert mtan["parameters"]["shared"] == hard["parameters"]["shared"]  # the same SmallCNN, shared
    assert mtan["parameters"]["left"] > hard["parameters"]["left"]  # plus attention modules per task
    assert mmoe["parameters"]["left"] - hard["parameters"]["left"] == 240 * 4  # a gate per task
    for row in (hard, stitch, mtan):
        assert row["test/left/accuracy"] > 0.2 and row["test/right/accuracy"] > 0.2  # chance is 0.1


def test_sequence_digits_config_learns_the_digits_with_an_lstm(tmp_path):
    config = ROOT / "examples" / "configs" / "sequence_digits.yaml"
    cli = run(
        [
            "fit", "--config", str(config),
            "--trainer.max_epochs", "2",
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false",
            "--data.init_args.train_size", "3000",
            "--data.init_args.val_size", "500",
            "--data.init_args.test_size", "500",
        ]
    )  # fmt: skip
    backbone = cli.model.backbone
    assert isinstance(backbone, RNNEncoder) and backbone.input_layout == "image_columns" and backbone.cell == "lstm"
    metrics = cli.trainer.callback_metrics
    assert metrics["test/left/accuracy"] > 0.2 and metrics["test/right/accuracy"] > 0.2  # chance is 0.1


def test_variable_length_sequences_example_packs_real_digit_columns():
    example = load_example("sequence_digits_variable_length")
    (padded, lengths), labels = example.collate(
        [example.ColumnSequences(example.MultiDigits("test", size=8))[i] for i in range(8)]
    )
    assert padded.shape == (8, int(lengths.max()), 12) and lengths.min() < 20 and set(labels) == {"left", "right", "sum"}
    metrics = example.main(["--epochs", "3", "--train-size", "2000", "--test-size", "400"])
    assert metrics["test/left/accuracy"] > 0.2 and metrics["test/right/accuracy"] > 0.2
