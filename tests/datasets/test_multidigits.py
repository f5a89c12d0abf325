import math

import pytest
import torch
from lightning.pytorch import LightningDataModule

from lightning_mtl.data import SharedInputLoader
from lightning_mtl.datasets import MultiDigits, MultiDigitsDataModule, multidigits_per_task

sklearn_datasets = pytest.importorskip("sklearn.datasets")


@pytest.fixture(scope="module")
def sources():
    digits = sklearn_datasets.load_digits()
    return torch.from_numpy(digits.images).float() / 16.0, torch.from_numpy(digits.target)


@pytest.fixture(scope="module")
def train():
    return MultiDigits("train", size=3000, seed=0)


def test_shapes_dtypes_and_range(train):
    assert len(train) == 3000
    assert train.images.shape == (3000, *MultiDigits.IMAGE_SHAPE) == (3000, 1, 12, 20)
    assert train.images.dtype == torch.float32
    assert train.images.min() == 0.0 and train.images.max() == 1.0
    x, y = train[7]
    assert x.shape == (1, 12, 20) and x.dtype == torch.float32
    assert set(y) == {"left", "right", "sum"}
    assert y["left"].dtype == y["right"].dtype == torch.int64
    assert y["sum"].dtype == torch.float32
    assert all(target.shape == () for target in y.values())
    assert train.source_indices.shape == train.digits.shape == (3000, 2)


def test_default_sizes():
    assert MultiDigits.DEFAULT_SIZES == {"train": 10_000, "val": 2_000, "test": 2_000}
    assert len(MultiDigits("val")) == 2_000


def test_labels_match_sources(train, sources):
    _, classes = sources
    assert torch.equal(train.targets["left"], classes[train.source_indices[:, 0]])
    assert torch.equal(train.targets["right"], classes[train.source_indices[:, 1]])
    assert torch.equal(train.digits, classes[train.source_indices])
    total = train.targets["left"] + train.targets["right"]
    unscaled = train.targets["sum"] * MultiDigits.SUM_STD + MultiDigits.SUM_MEAN
    assert torch.allclose(unscaled, total.float(), atol=1e-5)
    raw = MultiDigits("train", size=3000, seed=0, standardize_sum=False)
    assert torch.equal(raw.targets["sum"], total.float())
    assert MultiDigits.SUM_MEAN == 9.0 and MultiDigits.SUM_STD == pytest.approx(math.sqrt(16.5))


def test_both_digits_are_in_the_image(train, sources):
    images, _ = sources
    for index in range(50):
        composite = train.images[index, 0]
        for side in range(2):
            digit = images[train.source_indices[index, side]]
            found = any(
                torch.all(composite[r : r + 8, c : c + 8] >= digit)
                for r in range(12 - 7)
                for c in range(20 - 7)
            )
            assert found


def test_left_digit_is_left_of_right_digit(train, sources):
    images, _ = sources
    index = 0
    composite = train.images[index, 0]
    columns = []
    for side in range(2):
        digit = images[train.source_indices[index, side]]
        columns.append(
            next(
                c
                for c in range(20 - 7)
                for r in range(12 - 7)
                if torch.all(composite[r : r + 8, c : c + 8] >= digit)
            )
        )
    assert columns[0] < columns[1]


def test_deterministic_by_seed(train):
    again = MultiDigits("train", size=3000, seed=0)
    assert torch.equal(train.images, again.images)
    assert torch.equal(train.source_indices, again.source_indices)
    for task in MultiDigits.TASKS:
        assert torch.equal(train.targets[task], again.targets[task])


def test_different_seeds_differ(train):
    other = MultiDigits("train", size=3000, seed=1)
    assert not torch.equal(train.images, other.images)
    assert not torch.equal(train.source_indices, other.source_indices)


def test_tasks_select_targets_not_images(train):
    subset = MultiDigits("train", size=3000, seed=0, tasks=["right"])
    assert subset.tasks == ("right",)
    assert set(subset[0][1]) == {"right"}
    assert torch.equal(subset.images, train.images)


def test_source_partition_is_disjoint_and_complete():
    partition = MultiDigits.source_partition()
    sets = {split: set(indices.tolist()) for split, indices in partition.items()}
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    assert set().union(*sets.values()) == set(range(1797))
    assert len(sets["val"]) == len(sets["test"]) == 269
    other = MultiDigits.source_partition(split_seed=1)
    assert not torch.equal(partition["train"], other["train"])


@pytest.mark.parametrize("seeds", [(0, 0, 0), (0, 1, 2)])
def test_splits_do_not_share_source_images(seeds):
    used = {}
    for split, seed in zip(("train", "val", "test"), seeds):
        dataset = MultiDigits(split, size=4000, seed=seed)
        used[split] = set(dataset.source_indices.flatten().tolist())
        assert used[split] <= set(MultiDigits.source_partition()[split].tolist())
    assert not used["train"] & used["val"]
    assert not used["train"] & used["test"]
    assert not used["val"] & used["test"]


def test_every_split_has_every_class():
    for split in ("train", "val", "test"):
        dataset = MultiDigits(split)
        for task in ("left", "right"):
            assert set(dataset.targets[task].tolist()) == set(range(10))


def test_task_dataset_view(train):
    view = train.task_dataset("sum")
    assert len(view) == len(train)
    x, y = view[5]
    assert torch.equal(x, train.images[5]) and torch.equal(y, train.targets["sum"][5])
    part = train.task_dataset("left", indices=[3, 9])
    assert len(part) == 2 and torch.equal(part[1][1], train.targets["left"][9])
    with pytest.raises(ValueError, match="task"):
        MultiDigits("val", size=10, tasks=["left"]).task_dataset("sum")


def test_per_task_datasets():
    sizes = {"left": 300, "right": 200, "sum": 100}
    datasets = multidigits_per_task("train", size=sizes, seed=3)
    assert {task: len(ds) for task, ds in datasets.items()} == sizes
    x, y = datasets["left"][0]
    assert x.shape == (1, 12, 20) and y.dtype == torch.int64 and y.shape == ()
    assert datasets["sum"][0][1].dtype == torch.float32
    first_images = {task: ds[0][0] for task, ds in datasets.items()}
    assert not torch.equal(first_images["left"], first_images["right"])
    again = multidigits_per_task("train", size=sizes, seed=3)
    assert torch.equal(again["right"].tensors[0], datasets["right"].tensors[0])
    defaults = multidigits_per_task("val", tasks=["left"])
    assert list(defaults) == ["left"] and len(defaults["left"]) == 2000


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"split": "validation"}, "split"),
        ({"size": 0}, "size"),
        ({"seed": -1}, "seed"),
        ({"tasks": []}, "tasks"),
        ({"tasks": ["left", "depth"]}, "tasks"),
        ({"tasks": ["left", "left"]}, "tasks"),
        ({"tasks": "left"}, "tasks"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction"),
        ({"split_seed": -3}, "split_seed"),
    ],
)
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MultiDigits(**{"size": 10, **kwargs})


def test_per_task_invalid_sizes():
    with pytest.raises(ValueError, match="size"):
        multidigits_per_task("train", size={"left": 10}, tasks=["left", "right"])
    with pytest.raises(ValueError, match="size"):
        multidigits_per_task("train", size={"left": 0}, tasks=["left"])


def test_builds_fast():
    import time

    MultiDigits("test", size=10)
    start = time.perf_counter()
    MultiDigits("train", size=10_000, seed=123)
    assert time.perf_counter() - start < 1.0


def test_learnable():
    torch.manual_seed(0)
    train, test = MultiDigits("train", size=4000, seed=0), MultiDigits("test", size=1000, seed=0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(240, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(8):
        for batch in torch.randperm(len(train)).split(128):
            loss = torch.nn.functional.cross_entropy(
                model(train.images[batch]), train.targets["left"][batch]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(test.images).argmax(1) == test.targets["left"]).float().mean()
    assert accuracy > 0.6


def test_datamodule_batches():
    data = MultiDigitsDataModule(batch_size=32, train_size=256, val_size=64, test_size=48, seed=5)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (32, 1, 12, 20) and x.dtype == torch.float32
    assert set(y) == {"left", "right", "sum"}
    assert y["left"].shape == y["right"].shape == y["sum"].shape == (32,)
    assert y["left"].dtype == torch.int64 and y["sum"].dtype == torch.float32
    assert len(data.train_dataloader()) == 8 and len(data.val_dataloader()) == 2
    val_x, _ = next(iter(data.val_dataloader()))
    assert torch.equal(val_x, data.datasets["val"].images[:32])
    test_x, _ = next(iter(data.test_dataloader()))
    predict_x, _ = next(iter(data.predict_dataloader()))
    assert torch.equal(test_x, predict_x) and len(data.test_dataloader().dataset) == 48


def test_datamodule_shuffle_is_seeded():
    def first_batch(seed):
        data = MultiDigitsDataModule(batch_size=16, train_size=128, seed=seed)
        return next(iter(data.train_dataloader()))[0]

    assert torch.equal(first_batch(1), first_batch(1))
    unshuffled = MultiDigits("train", size=128, seed=1).images[:16]
    assert not torch.equal(first_batch(1), unshuffled)


def test_datamodule_tasks_and_validation():
    data = MultiDigitsDataModule(batch_size=8, train_size=16, tasks=["sum"])
    _, y = next(iter(data.train_dataloader()))
    assert set(y) == {"sum"}
    with pytest.raises(ValueError, match="batch_size"):
        MultiDigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match="val_size"):
        MultiDigitsDataModule(val_size=-1)
    with pytest.raises(ValueError, match="num_workers"):
        MultiDigitsDataModule(num_workers=-1)
    with pytest.raises(ValueError, match="tasks"):
        MultiDigitsDataModule(tasks=["middle"])


def test_datamodule_from_config():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--data", type=LightningDataModule)
    config = parser.parse_string(
        """
        data:
          class_path: lightning_mtl.datasets.MultiDigitsDataModule
          init_args:
            batch_size: 16
            train_size: 64
            tasks: [left, sum]
        """
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    data = instantiate(config).data
    assert isinstance(data, MultiDigitsDataModule)
    assert data.batch_size == 16 and data.tasks == ("left", "sum")
    assert isinstance(data.train_dataloader(), SharedInputLoader)  # resumable: the position is checkpointed
    assert data.hparams.train_size == 64


def test_datamodule_with_trainer():
    from lightning.pytorch import LightningModule, Trainer

    from lightning_mtl.architectures import SmallCNN

    class TwoHeads(LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = SmallCNN(channels=(4, 8), out_features=16, input_size=(12, 20))
            self.heads = torch.nn.ModuleDict(
                {"left": torch.nn.Linear(16, 10), "sum": torch.nn.Linear(16, 1)}
            )

        def _loss(self, batch):
            x, y = batch
            features = self.backbone(x)
            left = torch.nn.functional.cross_entropy(self.heads["left"](features), y["left"])
            total = torch.nn.functional.mse_loss(self.heads["sum"](features).squeeze(-1), y["sum"])
            return left + total

        def training_step(self, batch, batch_idx):
            return self._loss(batch)

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", self._loss(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = MultiDigitsDataModule(batch_size=16, train_size=64, val_size=32, tasks=["left", "sum"])
    trainer = Trainer(
        fast_dev_run=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TwoHeads(), datamodule=data)
    assert trainer.state.finished


def test_task_dataset_takes_a_boolean_mask_as_a_mask(train):
    mask = torch.zeros(len(train), dtype=torch.bool)
    mask[[1, 2, 4, 5]] = True
    subset = train.task_dataset("left", mask)
    assert len(subset) == 4
    assert torch.equal(subset.tensors[1], train.targets["left"][[1, 2, 4, 5]])
    with pytest.raises(ValueError, match="boolean `indices` mask must have one entry per item"):
        train.task_dataset("left", mask[:10])


@pytest.mark.parametrize("split, argument", [("val", "val_fraction"), ("test", "test_fraction")])
def test_a_fraction_too_small_to_cover_every_digit_class_is_refused_naming_it(split, argument):
    with pytest.raises(ValueError, match=rf"`{argument}` leaves the '{split}' split source images of \d of the 10"):
        MultiDigits(split, size=10, **{argument: 0.002})


def test_per_task_size_of_the_wrong_type_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"`size` must be an int, a mapping \{task: int\} or None, got 100.0"):
        multidigits_per_task(size=100.0)
