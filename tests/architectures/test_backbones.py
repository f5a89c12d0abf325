import pytest
import torch
from jsonargparse import ArgumentParser
from torch import nn

from lightning_mtl.architectures import MLP, SmallCNN

IMAGES = torch.rand(5, 1, 12, 20)


def _instantiate(config: dict) -> nn.Module:
    parser = ArgumentParser()
    parser.add_argument("--model", type=nn.Module)
    namespace = parser.parse_object({"model": config})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return instantiate(namespace).model


def test_small_cnn_shapes_with_input_size():
    model = SmallCNN(input_size=(12, 20))
    assert model.out_features == 128
    assert model(IMAGES).shape == (5, 128)
    assert model.feature_channels == 64 and model.feature_size == (3, 5)
    assert model.forward_features(IMAGES).shape == (5, 64, 3, 5)
    assert len(model.blocks) == 2


def test_small_cnn_without_input_size_pools_any_size():
    model = SmallCNN(in_channels=3, channels=(8, 16, 32), out_features=20)
    assert model.feature_size is None
    for size in [(12, 20), (32, 32), (9, 41)]:
        assert model(torch.rand(2, 3, *size)).shape == (2, 20)


def test_small_cnn_options():
    model = SmallCNN(
        channels=[4], out_features=7, input_size=[12, 20], kernel_size=5, batch_norm=True
    )
    assert model.input_size == (12, 20) and model.feature_size == (6, 10)
    assert any(isinstance(module, nn.BatchNorm2d) for module in model.modules())
    assert model(IMAGES).shape == (5, 7)


def test_small_cnn_features_are_non_negative_and_have_gradients():
    model = SmallCNN(channels=(4, 8), out_features=16, input_size=(12, 20))
    features = model(IMAGES)
    assert (features >= 0).all()
    features.sum().backward()
    assert all(parameter.grad is not None for parameter in model.parameters())


def test_small_cnn_rejects_wrong_input_size():
    model = SmallCNN(input_size=(12, 20))
    with pytest.raises(ValueError, match="input_size"):
        model(torch.rand(2, 1, 16, 16))


def test_small_cnn_state_dict_round_trip():
    model = SmallCNN(channels=(4, 8), out_features=16, input_size=(12, 20))
    copy = SmallCNN(channels=(4, 8), out_features=16, input_size=(12, 20))
    copy.load_state_dict(model.state_dict())
    assert torch.equal(model(IMAGES), copy(IMAGES))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"in_channels": 0}, "in_channels"),
        ({"channels": []}, "channels"),
        ({"channels": (8, 0)}, "channels"),
        ({"channels": "32"}, "channels"),
        ({"out_features": -1}, "out_features"),
        ({"kernel_size": 4}, "kernel_size"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"input_size": (12,)}, "input_size"),
        ({"input_size": (12, 0)}, "input_size"),
        ({"input_size": (12, 20), "channels": (8, 8, 8, 8)}, "input_size"),
    ],
)
def test_small_cnn_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        SmallCNN(**kwargs)


def test_mlp_backbone_and_head():
    backbone = MLP(240, hidden=[64, 32])
    assert backbone.out_features == 32
    features = backbone(IMAGES)
    assert features.shape == (5, 32) and (features >= 0).all()

    head = MLP(32, hidden=[], out_features=10)
    assert head.out_features == 10
    assert head(features).shape == (5, 10)
    assert sum(isinstance(module, nn.Linear) for module in head.modules()) == 1

    model = MLP(240, hidden=[16], out_features=3, activation="gelu", dropout=0.2)
    assert model.out_features == 3 and model(IMAGES).shape == (5, 3)
    assert any(isinstance(module, nn.Dropout) for module in model.modules())
    assert any(isinstance(module, nn.GELU) for module in model.modules())


def test_mlp_without_flatten_acts_on_last_dimension():
    model = MLP(20, hidden=[8], flatten=False)
    assert model(IMAGES).shape == (5, 1, 12, 8)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"in_features": 0}, "in_features"),
        ({"hidden": [8, -2]}, "hidden"),
        ({"hidden": "8"}, "hidden"),
        ({"hidden": [], "out_features": None}, "hidden"),
        ({"out_features": 0}, "out_features"),
        ({"activation": "swish"}, "activation"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
    ],
)
def test_mlp_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        MLP(**{"in_features": 240, "hidden": [8], **kwargs})


def test_small_cnn_from_config():
    model = _instantiate(
        {
            "class_path": "lightning_mtl.architectures.SmallCNN",
            "init_args": {"channels": [8, 16], "out_features": 32, "input_size": [12, 20]},
        }
    )
    assert isinstance(model, SmallCNN)
    assert model.input_size == (12, 20) and model.out_features == 32
    assert model(IMAGES).shape == (5, 32)


def test_mlp_from_config():
    model = _instantiate(
        {
            "class_path": "lightning_mtl.architectures.MLP",
            "init_args": {"in_features": 240, "hidden": [64], "out_features": 10, "dropout": 0.1},
        }
    )
    assert isinstance(model, MLP) and model.out_features == 10
    assert model(IMAGES).shape == (5, 10)


def test_config_validation_error_reaches_the_user():
    with pytest.raises(ValueError, match="`channels`"):
        _instantiate(
            {"class_path": "lightning_mtl.architectures.SmallCNN", "init_args": {"channels": []}}
        )
