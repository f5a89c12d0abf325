"""MultiTaskDataModule and MultiTaskLoader without a Trainer: batch forms, validation, state."""

import threading
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.fabric.utilities.types import _Stateful
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from lightning_mtl.data import MultiTaskDataModule, MultiTaskLoader, MultiTaskSampler, SharedInputLoader


def ids_dataset(size: int, offset: int = 0) -> TensorDataset:
    """Items ``(x, y)`` with ``x = offset + index`` so batches reveal their samples."""
    return TensorDataset(torch.arange(size).float().unsqueeze(1) + offset, torch.arange(size) % 3)


def task_data() -> dict[str, TensorDataset]:
    return {"a": ids_dataset(10), "b": ids_dataset(25, 1000)}


def ids(batch: dict) -> dict[str, list[int]]:
    return {task: [int(v) for v in x.flatten()] for task, (x, _) in batch.items()}


class SharedDataset(Dataset):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        return torch.tensor([float(i)]), {"depth": torch.tensor(float(i)), "seg": torch.tensor(i % 2)}


class CountingDataset(Dataset):
    def __init__(self, size: int) -> None:
        self.size, self.loads = size, 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        self.loads += 1
        return torch.tensor([float(i)]), torch.tensor(0)


class Stream(IterableDataset):
    def __iter__(self):
        yield from range(3)


def test_train_batch_form() -> None:
    dm = MultiTaskDataModule(task_data(), batch_size=4, sampling="zip")
    loader = dm.train_dataloader()
    assert isinstance(loader, MultiTaskLoader) and not isinstance(loader, DataLoader)
    assert dm.task_names == ["a", "b"]
    batches = list(loader)
    assert len(batches) == len(loader) == 7
    for batch in batches:
        assert list(batch) == ["a", "b"]
        x, y = batch["a"]
        assert x.shape[1:] == (1,) and x.shape[0] == y.shape[0] <= 4


def test_single_task_modes_hold_one_task() -> None:
    for sampling in ("round_robin", "proportional", "temperature", "sequential"):
        loader = MultiTaskDataModule(task_data(), batch_size=4, sampling=sampling).train_dataloader()
        assert all(len(batch) == 1 for batch in loader)
        assert len(list(loader)) == 3 + 7


def test_per_task_batch_sizes() -> None:
    dm = MultiTaskDataModule(task_data(), val=task_data(), batch_size={"a": 3, "b": 9}, sampling="zip")
    batch = next(iter(dm.train_dataloader()))
    assert {task: len(x) for task, (x, _) in batch.items()} == {"a": 3, "b": 9}
    val_sizes = [(task, len(x)) for batch in dm.val_dataloader() for task, (x, _) in batch.items()]
    assert val_sizes == [("a", 3)] * 3 + [("a", 1)] + [("b", 9)] * 2 + [("b", 7)]


def test_shuffle_false_keeps_order() -> None:
    dm = MultiTaskDataModule(task_data(), batch_size=4, sampling="sequential", shuffle=False)
    got = [ids(batch) for batch in dm.train_dataloader()]
    assert [i for b in got for i in b.get("a", [])] == list(range(10))
    assert [i for b in got for i in b.get("b", [])] == list(range(1000, 1025))


def test_determinism_across_builds_and_epochs() -> None:
    def epoch(dm: MultiTaskDataModule, e: int) -> list[dict]:
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(e)
        return [ids(batch) for batch in loader]

    one = MultiTaskDataModule(task_data(), batch_size=4, sampling="temperature", seed=7)
    two = MultiTaskDataModule(task_data(), batch_size=4, sampling="temperature", seed=7)
    assert epoch(one, 0) == epoch(two, 0)
    assert epoch(one, 1) == epoch(two, 1)
    assert epoch(one, 0) != epoch(one, 1)


def test_eval_splits_are_sequential_unshuffled_full() -> None:
    data = task_data()
    dm = MultiTaskDataModule(data, val={"b": data["b"]}, test=data, predict=data, batch_size=4, sampling="zip")
    val = [ids(batch) for batch in dm.val_dataloader()]
    assert all(list(batch) == ["b"] for batch in val)
    assert [i for batch in val for i in batch["b"]] == list(range(1000, 1025))
    for loader in (dm.test_dataloader(), dm.predict_dataloader()):
        got = [ids(batch) for batch in loader]
        assert [list(batch) for batch in got] == [["a"]] * 3 + [["b"]] * 7
        assert [i for batch in got for ids_ in batch.values() for i in ids_] == list(range(10)) + list(
            range(1000, 1025)
        )


def test_eval_sharding_pads_but_predict_does_not() -> None:
    data = task_data()
    dm = MultiTaskDataModule(data, val=data, predict=data, batch_size=4)
    for split, padded in (("val", True), ("predict", False)):
        loaders = []
        for rank in (0, 1, 2):
            dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"rank": rank, "num_replicas": 3})
            loader = getattr(dm, f"{split}_dataloader")()
            assert (loader.sampler.rank, loader.sampler.world_size) == (rank, 3)
            loaders.append(loader)
        got = [[ids(b) for b in loader] for loader in loaders]
        if padded:
            assert len({len(g) for g in got}) == 1
            assert all([list(b) for b in g] == [list(b) for b in got[0]] for g in got)
        seen = Counter(i for g in got for b in g for v in b.values() for i in v)
        assert set(seen) == set(range(10)) | set(range(1000, 1025))
        assert sum(seen.values()) == (12 + 27 if padded else 35)


def test_shared_input_trains_from_a_resumable_loader_and_evaluates_from_a_dataloader() -> None:
    dm = MultiTaskDataModule(SharedDataset(), val=SharedDataset(), batch_size=5, shuffle=False)
    assert dm.task_names is None
    loader = dm.train_dataloader()
    assert type(loader) is SharedInputLoader
    batches = list(loader)
    x, y = batches[0]
    assert x.shape == (5, 1) and set(y) == {"depth", "seg"} and y["seg"].shape == (5,)
    # shuffle=False keeps the dataset order, like a plain DataLoader
    assert torch.cat([x for x, _ in batches]).flatten().tolist() == [SharedDataset()[i][0].item() for i in range(len(SharedDataset()))]
    assert type(dm.val_dataloader()) is DataLoader


def test_shared_input_shuffle_is_seeded() -> None:
    def order(seed: int) -> list[int]:
        loader = MultiTaskDataModule(SharedDataset(), batch_size=12, seed=seed).train_dataloader()
        return next(iter(loader))[0].flatten().int().tolist()

    assert order(1) == order(1) and order(1) != order(2)


def test_collate_fn_gets_one_tasks_items() -> None:
    seen = []

    def collate(items: list) -> int:
        seen.append(len(items))
        return len(items)

    dm = MultiTaskDataModule(task_data(), batch_size={"a": 2, "b": 5}, collate_fn=collate, sampling="zip_shortest")
    assert list(dm.train_dataloader()) == [{"a": 2, "b": 5}] * 5
    assert seen == [2, 5] * 5


def test_missing_splits_have_no_hooks() -> None:
    from lightning_utilities.core.overrides import is_overridden
    from lightning.pytorch import LightningDataModule

    dm = MultiTaskDataModule(task_data(), test=task_data())
    overridden = {h: is_overridden(f"{h}_dataloader", dm, LightningDataModule) for h in ("train", "val", "test", "predict")}
    assert overridden == {"train": True, "val": False, "test": True, "predict": False}


def test_workers_give_the_same_batches() -> None:
    plain = [ids(b) for b in MultiTaskDataModule(task_data(), batch_size=4, sampling="temperature").train_dataloader()]
    loader = MultiTaskDataModule(task_data(), batch_size=4, sampling="temperature", num_workers=2).train_dataloader()
    assert [ids(b) for b in loader] == plain


def test_lightning_sees_set_epoch_and_state() -> None:
    loader = MultiTaskDataModule(task_data(), batch_size=4).train_dataloader()
    _set_sampler_epoch(loader, 3)
    assert loader.sampler.epoch == 3
    assert isinstance(loader, _Stateful)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_dict_round_trip_mid_epoch(num_workers: int) -> None:
    dm = MultiTaskDataModule(task_data(), batch_size=4, sampling="temperature", num_workers=num_workers)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    full = [ids(b) for b in loader]
    iterator = iter(loader)
    consumed = [ids(next(iterator)) for _ in range(4)]
    state = loader.state_dict()
    assert (state["epoch"], state["step"], state["num_steps"]) == (1, 4, 10)

    fresh = dm.train_dataloader()
    fresh.load_state_dict(state)
    assert fresh.state_dict()["step"] == 4  # before iterating
    fresh.sampler.set_epoch(1)
    assert consumed + [ids(b) for b in fresh] == full
    assert fresh.state_dict()["step"] == 10


def test_state_at_epoch_end_resumes_next_epoch() -> None:
    dm = MultiTaskDataModule(task_data(), batch_size=4, sampling="round_robin")
    loader = dm.train_dataloader()
    list(loader)
    fresh = dm.train_dataloader()
    fresh.load_state_dict(loader.state_dict())
    assert (fresh.sampler.epoch, fresh.sampler.pending_start) == (1, 0)
    loader.sampler.set_epoch(1)
    assert fresh.state_dict()["step"] == 0
    assert [ids(b) for b in fresh] == [ids(b) for b in loader]


def test_new_epoch_resets_state_step() -> None:
    loader = MultiTaskDataModule(task_data(), batch_size=4).train_dataloader()
    iterator = iter(loader)
    next(iterator)
    assert loader.state_dict()["step"] == 1
    loader.sampler.set_epoch(1)
    assert loader.state_dict() | {"config": None} == {"epoch": 1, "step": 0, "num_steps": 7, "config": None}


def test_resume_loads_no_skipped_data() -> None:
    data = {"a": CountingDataset(20), "b": CountingDataset(40)}
    dm = MultiTaskDataModule(data, batch_size=4, sampling="round_robin")
    loader = dm.train_dataloader()
    loader.load_state_dict({"epoch": 0, "step": 13, "num_steps": 15})
    assert len(list(loader)) == 2
    assert data["a"].loads + data["b"].loads == 8


def test_changed_config_warns_on_load() -> None:
    state = MultiTaskDataModule(task_data(), batch_size=4).train_dataloader().state_dict()
    other = MultiTaskDataModule(task_data(), batch_size=5).train_dataloader()
    with pytest.warns(UserWarning, match="configuration changed"):
        other.load_state_dict(state)


def test_loader_checks_datasets_against_sampler() -> None:
    with pytest.raises(ValueError, match="'a'"):
        MultiTaskLoader({"a": ids_dataset(5)}, MultiTaskSampler({"a": 6}))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sampling": "mixed"}, ValueError, "zip, zip_shortest, round_robin, proportional, temperature, sequential"),
        ({"temperature": 0}, ValueError, "temperature"),
        ({"temperature": -2.0}, ValueError, "temperature"),
        ({"train": {"a": ids_dataset(3), "empty": ids_dataset(0)}}, ValueError, "'empty'"),
        ({"val": {"a": ids_dataset(0)}}, ValueError, "`val`.*'a'"),
        ({"batch_size": {"a": 2}}, ValueError, "'b'"),
        ({"batch_size": {"a": 2, "b": 2, "c": 2}}, ValueError, "'c'"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": -3}, ValueError, "batch_size"),
        ({"batch_size": {"a": 2, "b": 0}}, ValueError, r"batch_size\['b'\]"),
        ({"train": {"a/b": ids_dataset(3)}}, ValueError, "'a/b'"),
        ({"train": {"": ids_dataset(3)}}, ValueError, "''"),
        ({"train": {}}, ValueError, "`train`"),
        ({"train": None}, ValueError, "`train`"),
        ({"train": SharedDataset(), "sampling": "round_robin"}, ValueError, "round_robin"),
        ({"train": SharedDataset(), "batch_size": {"a": 2}}, ValueError, "train"),
        ({"val": {"a": ids_dataset(3), "c": ids_dataset(3)}}, ValueError, "'c'"),
        ({"train": {"a": Stream()}}, TypeError, "'a'"),
        ({"num_workers": -1}, ValueError, "num_workers"),
    ],
)
def test_bad_input(kwargs: dict, error: type, match: str) -> None:
    args = {"train": task_data(), **kwargs}
    with pytest.raises(error, match=match):
        MultiTaskDataModule(**args)


def test_a_shared_input_iterable_dataset_trains_in_its_own_order_with_the_default_shuffle() -> None:
    dm = MultiTaskDataModule(Stream(), batch_size=2)  # shuffle=True by default: nothing to shuffle here
    assert [batch.tolist() for batch in dm.train_dataloader()] == [[0, 1], [2]]


class SizedShared(Dataset):
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        return torch.tensor([float(i)]), {"a": torch.tensor(0.0)}


def setup_on_ranks(datamodules: list, stage: str = "fit", use_distributed_sampler: bool = True) -> list:
    """``setup(stage)`` of one data module per simulated process (a thread each), with a real all-gather
    across them; returns what each raised (``None`` if nothing). A rank left waiting at a collective
    breaks the barrier (``BrokenBarrierError``) instead of hanging the test."""
    world = len(datamodules)
    barrier = threading.Barrier(world, timeout=10)
    sent: list = [None] * world
    raised: list = [None] * world

    def run(rank: int) -> None:
        def all_gather(tensor: torch.Tensor) -> torch.Tensor:
            sent[rank] = tensor
            barrier.wait()
            gathered = torch.stack(sent)
            barrier.wait()
            return gathered

        dm = datamodules[rank]
        dm.trainer = SimpleNamespace(
            world_size=world,
            strategy=SimpleNamespace(all_gather=all_gather, root_device=torch.device("cpu")),
            _accelerator_connector=SimpleNamespace(use_distributed_sampler=use_distributed_sampler),
        )
        try:
            dm.setup(stage)
        except Exception as e:  # noqa: BLE001 -- reported to the test
            raised[rank] = e

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return raised


def test_setup_raises_on_every_process_when_lengths_differ() -> None:
    def datamodule(size_b: int) -> MultiTaskDataModule:
        data = {"a": ids_dataset(10), "b": ids_dataset(size_b)}
        return MultiTaskDataModule(data, val=data, test={"a": ids_dataset(4)})

    raised = setup_on_ranks([datamodule(25), datamodule(26), datamodule(25)])
    assert all(isinstance(e, ValueError) for e in raised), raised
    assert len({str(e) for e in raised}) == 1
    message = str(raised[0])
    assert message.startswith("Dataset lengths differ across the 3 processes")
    assert "`train` task 'b': 25 on ranks 0, 2; 26 on rank 1\n" in message
    assert "`val` task 'b': 25 on ranks 0, 2; 26 on rank 1\n" in message
    assert "task 'a'" not in message and "`test`" not in message
    assert "Build the same datasets on every process" in message
    # Only the splits a stage uses are checked: `test` is equal everywhere.
    assert setup_on_ranks([datamodule(25), datamodule(26), datamodule(25)], stage="test") == [None] * 3


def test_setup_passes_equal_lengths_and_checks_the_stages_split() -> None:
    assert setup_on_ranks([MultiTaskDataModule(task_data(), val=task_data()) for _ in range(2)]) == [None, None]
    dms = [MultiTaskDataModule(task_data(), val={"a": ids_dataset(size)}) for size in (10, 11)]
    raised = setup_on_ranks(dms, stage="validate")
    assert all(isinstance(e, ValueError) and "`val` task 'a': 10 on rank 0; 11 on rank 1" in str(e) for e in raised)


def test_setup_raises_on_every_process_when_tasks_differ() -> None:
    raised = setup_on_ranks([MultiTaskDataModule(task_data()), MultiTaskDataModule({"a": ids_dataset(10)})])
    assert all(isinstance(e, ValueError) and "different splits or tasks" in str(e) for e in raised), raised
    assert "datasets per rank: [2, 1]" in str(raised[0])


def test_setup_checks_a_shared_input_dataset_under_the_distributed_sampler() -> None:
    def dms() -> list:
        return [MultiTaskDataModule(SizedShared(size), val=SizedShared(5)) for size in (12, 13)]

    raised = setup_on_ranks(dms())
    assert all(isinstance(e, ValueError) and "`train` dataset: 12 on rank 0; 13 on rank 1" in str(e) for e in raised)
    assert "`val`" not in str(raised[0])
    # Without Lightning's DistributedSampler each process may hold its own shard; a stream has no length.
    assert setup_on_ranks(dms(), use_distributed_sampler=False) == [None, None]
    assert setup_on_ranks([MultiTaskDataModule(Stream()) for _ in range(2)]) == [None, None]


def test_setup_without_a_multi_process_trainer_does_nothing() -> None:
    dm = MultiTaskDataModule(task_data())
    dm.setup("fit")  # no Trainer
    dm.trainer = SimpleNamespace(world_size=1, strategy=None)
    dm.setup("fit")


@pytest.mark.parametrize("per_task", [True, False], ids=["per-task", "shared-input"])
def test_a_tuple_of_tensors_is_refused_with_the_wrapping_that_works(per_task) -> None:
    """``train={"a": (X, y)}`` was read as a 2-item dataset and failed later in collation."""
    X, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    train = {"a": (X, y)} if per_task else (X, y)
    where = "The `train` dataset of task 'a'" if per_task else "The `train` dataset"
    with pytest.raises(TypeError, match=rf"{where} is a tuple of 2 tensors \(\(10, 3\), \(10,\)\).*columns.*2 items.*TensorDataset\(X, y\)"):
        MultiTaskDataModule(train=train)
    MultiTaskDataModule(train={"a": torch.utils.data.TensorDataset(X, y)} if per_task else torch.utils.data.TensorDataset(X, y))
