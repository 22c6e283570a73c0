"""The literature's CNNs as ``model.preset``: their published sizes, and clear errors."""

from __future__ import annotations

import pytest

from fedmtl.config import parse_config
from fedmtl.errors import ConfigError
from fedmtl.models import build_model


def _params(model: dict, shape: tuple[int, ...], classes: int) -> int:
    net = build_model(parse_config({"model": model}).model, shape, classes, 0)
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(
    "preset, shape, classes, published",
    [
        # FedAvg (McMahan et al. 2017), section 3: "1,663,370 total parameters"
        ("fedavg_mnist", (1, 28, 28), 10, 1_663_370),
        # LEAF's FEMNIST CNN (Caldas et al. 2018) on its 62 classes
        ("femnist", (1, 28, 28), 62, 6_603_710),
        # FedAvg's CIFAR model, the TensorFlow tutorial's on 24x24 crops: "about 10^6 parameters"
        ("fedavg_cifar", (3, 24, 24), 10, 1_068_298),
    ],
)
def test_presets_have_the_published_sizes(preset, shape, classes, published):
    assert _params({"name": "cnn", "preset": preset}, shape, classes) == published


def test_the_default_cnn_is_unchanged_and_a_preset_is_written_out_in_full():
    assert _params({"name": "cnn"}, (1, 28, 28), 10) == 421_642  # 3x3 convolutions, a 128-unit layer
    resolved = parse_config({"model": {"name": "cnn", "preset": "femnist"}}).to_dict()["model"]
    assert resolved == {"name": "cnn", "preset": "femnist", "channels": [32, 64], "kernel": 5, "fc": [2048]}
    same = parse_config({"model": {"name": "cnn", "preset": "femnist", "kernel": 5, "fc": 2048}})
    assert same.to_dict()["model"] == resolved  # restating what the preset fixes is fine


@pytest.mark.parametrize(
    "model, message",
    [
        (
            {"preset": "femnist", "fc": 128},
            "config: model = {'preset': 'femnist', 'fc': 128}: preset 'femnist' fixes fc = [2048]; "
            "leave fc out or drop the preset",
        ),
        (
            {"preset": "resnet18"},
            "config: model.preset = 'resnet18': input should be 'femnist', 'fedavg_mnist' or 'fedavg_cifar'",
        ),
        ({"kernel": 4}, "config: model.kernel = 4: must be odd (the convolutions keep the image size)"),
        (
            {"fc": [64, 0]},
            "config: model.fc = [64, 0]: widths must be at least 1 (an empty list: no hidden dense layer)",
        ),
    ],
)
def test_bad_cnn_keys_name_the_problem(model, message):
    with pytest.raises(ConfigError) as err:
        parse_config({"model": {"name": "cnn", **model}})
    assert str(err.value) == message


def test_too_many_pooling_blocks_for_the_image_is_a_config_error():
    cfg = parse_config({"model": {"name": "cnn", "channels": [4, 4, 4, 4]}}).model
    with pytest.raises(ConfigError, match=r"4 pooling blocks shrink \(1, 8, 8\) images to nothing"):
        build_model(cfg, (1, 8, 8), 10, 0)
