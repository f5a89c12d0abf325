"""MultiTaskDataModule under a real Trainer: batch forms, resume from checkpoints, 2-process DDP."""

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Dataset, TensorDataset

from conftest import run_script
from lightning_mtl.data import MultiTaskDataModule, MultiTaskLoader

pytestmark = pytest.mark.slow

TRAINER_KWARGS = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
)


def task_data() -> dict[str, TensorDataset]:
    return {
        task: TensorDataset(torch.arange(size).float().unsqueeze(1) + offset, torch.zeros(size))
        for task, size, offset in (("a", 10, 0), ("b", 23, 1000), ("c", 6, 2000))
    }


class Recorder(pl.LightningModule):
    """Records each step's epoch and {task: sample ids}; one shared layer serves every task."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)
        self.train_steps: list[tuple[int, dict]] = []
        self.val_steps: list[dict] = []

    @staticmethod
    def ids(batch: dict) -> dict[str, list[int]]:
        return {task: x.flatten().int().tolist() for task, (x, _) in batch.items()}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        assert isinstance(batch, dict)
        self.train_steps.append((self.current_epoch, self.ids(batch)))
        return sum(self.linear(x / 1000).pow(2).mean() for x, _ in batch.values())

    def validation_step(self, batch: dict, batch_idx: int) -> None:  # no dataloader_idx: one loader
        self.val_steps.append(self.ids(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def datamodule(sampling: str, num_workers: int = 0) -> MultiTaskDataModule:
    data = task_data()
    return MultiTaskDataModule(
        data, val={"a": data["a"], "c": data["c"]}, batch_size=4, sampling=sampling, num_workers=num_workers
    )


def reference(sampling: str, epochs: int = 2, **trainer_kwargs) -> Recorder:
    model = Recorder()
    trainer = pl.Trainer(max_epochs=epochs, enable_checkpointing=False, **TRAINER_KWARGS, **trainer_kwargs)
    trainer.fit(model, datamodule=datamodule(sampling))
    return model


def test_fit_batch_forms() -> None:
    model = Recorder()
    trainer = pl.Trainer(max_epochs=2, enable_checkpointing=False, **TRAINER_KWARGS)
    trainer.fit(model, datamodule=datamodule("temperature"))
    assert isinstance(trainer.fit_loop._combined_loader.flattened[0], MultiTaskLoader)
    assert trainer.num_training_batches == 3 + 6 + 2
    assert len(model.train_steps) == 2 * 11
    assert all(len(ids) == 1 for _, ids in model.train_steps)
    epochs = [[ids for e, ids in model.train_steps if e == epoch] for epoch in (0, 1)]
    assert epochs[0] != epochs[1]  # Lightning's set_epoch reaches the sampler
    # Each validation run covers every validation task, one task per batch, in order.
    val = [list(ids.items()) for ids in model.val_steps]
    assert len(val) == 2 * (3 + 2)
    assert [i for (task, ids), in val[:5] for i in ids] == list(range(10)) + list(range(2000, 2006))


def test_zip_fit_batches_hold_all_tasks() -> None:
    model = reference("zip", epochs=1)
    assert len(model.train_steps) == 6
    assert all(list(ids) == ["a", "b", "c"] for _, ids in model.train_steps)


def test_shared_input_fit() -> None:
    class Shared(Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int):
            return torch.tensor([float(i)]), {"u": torch.tensor(float(i)), "v": torch.tensor(-float(i))}

    class SharedModel(Recorder):
        def training_step(self, batch, batch_idx):
            x, y = batch
            assert set(y) == {"u", "v"} and torch.equal(y["u"], x.flatten())
            self.train_steps.append((self.current_epoch, x.flatten().int().tolist()))
            return self.linear(x).pow(2).mean()

    model = SharedModel()
    pl.Trainer(max_epochs=1, enable_checkpointing=False, **TRAINER_KWARGS).fit(
        model, datamodule=MultiTaskDataModule(Shared(), batch_size=4)
    )
    assert sorted(i for _, ids in model.train_steps for i in ids) == list(range(10))


@pytest.mark.parametrize("limit_train_batches", [1.0, 5])
def test_resume_at_epoch_end(tmp_path: Path, limit_train_batches: float) -> None:
    limit = {"limit_train_batches": limit_train_batches}
    expected = reference("temperature", **limit).train_steps
    assert len(expected) == 2 * (11 if limit_train_batches == 1.0 else 5)

    first = Recorder()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    pl.Trainer(max_epochs=1, callbacks=[checkpoint], **TRAINER_KWARGS, **limit).fit(
        first, datamodule=datamodule("temperature")
    )
    resumed = Recorder()
    pl.Trainer(max_epochs=2, enable_checkpointing=False, **TRAINER_KWARGS, **limit).fit(
        resumed, datamodule=datamodule("temperature"), ckpt_path=tmp_path / "last.ckpt"
    )
    assert first.train_steps + resumed.train_steps == expected


@pytest.mark.parametrize(
    ("sampling", "num_workers", "stop_step"),
    [("temperature", 0, 4), ("temperature", 0, 11 + 5), ("zip", 0, 6 + 2), ("round_robin", 2, 11 + 3)],
)
def test_resume_mid_epoch(tmp_path: Path, sampling: str, num_workers: int, stop_step: int) -> None:
    expected = reference(sampling).train_steps

    first = Recorder()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=stop_step, filename="mid")
    pl.Trainer(max_steps=stop_step, callbacks=[checkpoint], **TRAINER_KWARGS).fit(
        first, datamodule=datamodule(sampling, num_workers)
    )
    assert len(first.train_steps) == stop_step
    state = torch.load(tmp_path / "mid.ckpt", weights_only=True)["loops"]["fit_loop"]["state_dict"]
    (loader_state,) = state["combined_loader"]
    steps_per_epoch = {"temperature": 11, "zip": 6, "round_robin": 11}[sampling]
    assert (loader_state["epoch"], loader_state["step"]) == divmod(stop_step, steps_per_epoch)

    resumed = Recorder()
    pl.Trainer(max_epochs=2, enable_checkpointing=False, **TRAINER_KWARGS).fit(
        resumed, datamodule=datamodule(sampling, num_workers), ckpt_path=tmp_path / "mid.ckpt"
    )
    assert first.train_steps + resumed.train_steps == expected


DDP_SCRIPT = Path(__file__).with_name("_ddp_fit.py")
DDP_MODES = ("zip", "round_robin", "temperature")


def run_ddp_script(out_dir: Path, timeout: float = 240) -> None:
    returncode, output = run_script(DDP_SCRIPT, out_dir, *DDP_MODES, timeout=timeout)
    assert returncode == 0, output[-4000:]


@pytest.fixture(scope="module")
def ddp_records(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    out_dir = tmp_path_factory.mktemp("ddp")
    run_ddp_script(out_dir)
    return {mode: [json.loads((out_dir / f"{mode}-rank{r}.json").read_text()) for r in (0, 1)] for mode in DDP_MODES}


@pytest.mark.parametrize("mode", DDP_MODES)
def test_ddp_same_tasks_disjoint_samples(ddp_records: dict, mode: str) -> None:
    ranks = ddp_records[mode]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["loader_type"] == "MultiTaskLoader" for r in ranks)
    # Sizes 37/101 with batch sizes 4/8 give 5 and 7 batches per rank.
    assert ranks[0]["num_steps"] == ranks[1]["num_steps"] == {"zip": 7, "round_robin": 12, "temperature": 12}[mode]
    train0, train1 = ranks[0]["train"], ranks[1]["train"]
    assert len(train0) == len(train1) == 2 * ranks[0]["num_steps"]
    for s0, s1 in zip(train0, train1):
        assert (s0["epoch"], s0["batch_idx"]) == (s1["epoch"], s1["batch_idx"])
        assert list(s0["ids"]) == list(s1["ids"])  # the same task(s) at every step
        for task in s0["ids"]:
            assert not set(s0["ids"][task]) & set(s1["ids"][task])
    if mode == "round_robin":  # one pass per epoch: every sample, plus DistributedSampler-style padding
        for epoch in (0, 1):
            for task, size, offset in (("a", 37, 0), ("b", 101, 1000)):
                seen = [i for r in ranks for s in r["train"] if s["epoch"] == epoch for i in s["ids"].get(task, [])]
                assert set(seen) == set(range(offset, offset + size)) and len(seen) == size + 1


@pytest.mark.parametrize("mode", DDP_MODES)
def test_ddp_validation_shards(ddp_records: dict, mode: str) -> None:
    val0, val1 = (r["val"] for r in ddp_records[mode])
    assert len(val0) == len(val1) == 2 * (5 + 7)
    for s0, s1 in zip(val0, val1):
        assert list(s0["ids"]) == list(s1["ids"]) and len(s0["ids"]) == 1
    first_run = [i for v in (val0, val1) for s in v if s["epoch"] == 0 for ids in s["ids"].values() for i in ids]
    assert set(first_run) == set(range(37)) | set(range(1000, 1101))
    assert len(first_run) == 38 + 102  # padded to a multiple of the world size, like DistributedSampler


UNEVEN_SCRIPT = Path(__file__).with_name("_ddp_uneven_fit.py")
UNEVEN_CASES = ("per_task_val", "per_task", "shared_input_val", "per_task_equal", "shared_input_equal")


@pytest.fixture(scope="module")
def uneven_records(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    # One launch runs every case in turn; a rank that hangs (validation with unequal step counts)
    # fails the run at the timeout instead of hanging the suite.
    out_dir = tmp_path_factory.mktemp("ddp_uneven")
    returncode, output = run_script(UNEVEN_SCRIPT, out_dir, *UNEVEN_CASES, timeout=120)
    assert returncode == 0, output[-4000:]
    records = {}
    for case in UNEVEN_CASES:
        paths = [out_dir / f"{case}-rank{r}.json" for r in (0, 1)]
        assert all(path.exists() for path in paths), f"{case}: a rank wrote no record\n{output[-4000:]}"
        records[case] = [json.loads(path.read_text()) for path in paths]
    return records


@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("per_task_val", ["`train` task 'b'", "`val` task 'b'"]),
        ("per_task", ["`train` task 'b'"]),
        ("shared_input_val", ["`train` dataset", "`val` dataset"]),
    ],
)
def test_ddp_unequal_dataset_lengths_raise_on_every_rank(uneven_records: dict, case: str, named: list[str]) -> None:
    for record in uneven_records[case]:
        assert record["train_steps"] == 0  # raised at setup, before any step
        error = record["error"]
        assert error is not None and error.startswith("Dataset lengths differ across the 2 processes")
        assert all(f"{name}: 96 on rank 0; 97 on rank 1\n" in error for name in named), error
        assert "task 'a'" not in error  # equal lengths are not reported
        assert "Build the same datasets on every process" in error


@pytest.mark.parametrize("case", ["per_task_equal", "shared_input_equal"])
def test_ddp_equal_dataset_lengths_train(uneven_records: dict, case: str) -> None:
    # After the failed fits, the same processes train normally: 6 steps per epoch, 2 epochs.
    assert [r["error"] for r in uneven_records[case]] == [None, None]
    assert [r["train_steps"] for r in uneven_records[case]] == [12, 12]


class ItemsWithLabels(Dataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], {"u": self.x[i, 0]}


class SharedInputModel(Recorder):
    def training_step(self, batch, batch_idx):
        return self.linear(batch[0]).pow(2).mean()


class FirstBatches(pl.Callback):
    def __init__(self) -> None:
        self.epochs: list[list] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epochs.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if isinstance(batch, dict):
            self.epochs[-1].append({task: x.flatten().tolist() for task, (x, _) in batch.items()})
        else:
            self.epochs[-1].append(batch[0].flatten().tolist())


@pytest.mark.parametrize("form", ["shared input", "per task"])
def test_overfit_batches_repeats_the_first_batches_unshuffled(form: str) -> None:
    """Lightning rebuilds a shuffled DataLoader with a SequentialSampler under overfit_batches; these loaders are
    not DataLoaders (that rebuild used to fail), so the data module builds them unshuffled itself."""
    if form == "shared input":
        x = torch.arange(10).float().unsqueeze(1)
        model, data = SharedInputModel(), MultiTaskDataModule(ItemsWithLabels(x), batch_size=4)
    else:
        model, data = Recorder(), MultiTaskDataModule(task_data(), batch_size=4, sampling="round_robin")
    seen = FirstBatches()
    kwargs = {**TRAINER_KWARGS, "limit_val_batches": 0}
    pl.Trainer(max_epochs=3, overfit_batches=2, enable_checkpointing=False, callbacks=[seen], **kwargs).fit(model, datamodule=data)
    assert len(seen.epochs) == 3 and all(len(epoch) == 2 for epoch in seen.epochs)
    assert seen.epochs[0] == seen.epochs[1] == seen.epochs[2]
    if form == "shared input":
        assert seen.epochs[0] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
