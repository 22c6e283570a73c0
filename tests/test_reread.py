"""A ``fedmtl pack`` store and a LEAF export read back with the config that made them: the keys that
made the federation are accepted when they match the record and refused, naming it, when not; a
LEAF export comes back with its shape and its values as exported."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from fedmtl.cli import main
from fedmtl.config import load_config
from fedmtl.data import load_federated
from fedmtl.errors import ConfigError

CONFIG = {
    "name": "made",
    "data": {
        "dataset": "digits",
        "partition": {"kind": "dirichlet", "alpha": 0.3, "num_clients": 6},
        "max_clients": 5,
    },
    "train": {"rounds": 1},
    "output": {"progress": False},
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("reread")
    cfg = root / "made.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    assert main(["pack", str(cfg), str(root / "store")]) == 0
    assert main(["pack", str(cfg), str(root / "leaf"), "--format", "leaf"]) == 0
    return root, cfg


@pytest.mark.parametrize("fmt", ["store", "leaf"])
def test_the_config_that_made_it_reads_it_back(written, fmt):
    root, cfg = written
    original = load_federated(load_config(cfg).data, 0)
    again = load_config(cfg, [f"data.dataset={fmt}", f"data.file={root / fmt}"])
    back = load_federated(again.data, 0)
    assert back.num_clients == original.num_clients == 5
    assert back.input_shape == original.input_shape == (1, 8, 8)  # the LEAF export's shape came back
    for a, b in zip(original.clients, back.clients, strict=True):
        assert np.allclose(np.asarray(a.x_train), np.asarray(b.x_train), atol=1e-5)  # not re-scaled
        assert np.array_equal(np.asarray(a.y_test), np.asarray(b.y_test))


@pytest.mark.parametrize("fmt", ["store", "leaf"])
def test_a_different_partition_is_refused_naming_the_recorded_one(written, fmt):
    root, cfg = written
    changed = load_config(cfg, [f"data.dataset={fmt}", f"data.file={root / fmt}", "data.partition.alpha=1"])
    with pytest.raises(ConfigError) as err:
        load_federated(changed.data, 0)
    message = str(err.value)
    verb = "packed" if fmt == "store" else "exported"
    assert message.startswith("config: data.partition = {")
    assert f"{root / fmt} was {verb} with data.partition = " in message and '"alpha": 0.3' in message
    assert "\n" not in message
    other = load_config(cfg, [f"data.dataset={fmt}", f"data.file={root / fmt}", "data.max_clients=3"])
    with pytest.raises(ConfigError, match=r"data.max_clients = 3: .* with data.max_clients = 5"):
        load_federated(other.data, 0)


def test_a_leaf_export_says_what_it_is_and_plain_leaf_data_is_read_as_before(written, tmp_path):
    root, _ = written
    side = yaml.safe_load((root / "leaf" / "fedmtl.json").read_text())
    assert side["input_shape"] == [1, 8, 8] and side["normalized"] == "channel"
    assert side["data"]["partition"]["alpha"] == 0.3
    plain = tmp_path / "plain"
    (plain).mkdir()
    for split in ("train", "test"):
        (plain / split).symlink_to(root / "leaf" / split)  # the same files without the record
    data = load_federated(load_config(None, ["data.dataset=leaf", f"data.file={plain}"]).data, 0)
    assert data.input_shape == (64,) and data.info["normalize"] == "standardize"
