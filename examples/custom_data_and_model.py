"""Your own data and your own model, plugged in from Python without editing fedmtl.

Each site keeps its readings in a file of its own (here: one ``.npz`` per site, written first so
the example runs anywhere). ``register_dataset`` teaches fedmtl to read that folder as a federation,
one client per site; ``register_model`` adds a network whose ``head`` is the per-site part that
personalised algorithms (here FedPer) keep on each client.

    python examples/custom_data_and_model.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from pydantic import BaseModel
from torch import nn

import fedmtl
from fedmtl.data import Clients, DataConfig, register_dataset
from fedmtl.experiment.run import RunResult
from fedmtl.models import ModelInput, register_model


def write_sites(folder: Path, sites: int = 8, seed: int = 0) -> Path:
    """Stand-in for data the sites already have: 6 sensor channels, a binary label whose rule
    shifts from site to site."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(sites):
        x = rng.normal(size=(int(rng.integers(80, 200)), 6)).astype(np.float32)
        y = (x[:, 0] + 0.5 * x[:, 1] * (1 if s % 2 else -1) > 0).astype(np.int64)
        np.savez(folder / f"site_{s:02d}.npz", x=x, y=y)
    return folder


@register_dataset("sensor_sites", kind="natural", description="one .npz of x, y per site in data.dir")
def read_sites(cfg: DataConfig) -> Clients:
    files = sorted(Path(cfg.dir).glob("site_*.npz"))
    arrays = [np.load(f) for f in files]
    return Clients([f.stem for f in files], [a["x"] for a in arrays], [a["y"] for a in arrays])


class TwoLayerParams(BaseModel):
    """The config keys of ``model: {name: two_layer, ...}``."""

    width: int = 32


class TwoLayer(nn.Module):
    def __init__(self, features: int, width: int, outputs: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(features, width), nn.ReLU())  # shared
        self.head = nn.Linear(width, outputs)  # personal under FedPer, Ditto, ...

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.head(self.body(x))


@register_model("two_layer", params=TwoLayerParams)
def build_two_layer(p: TwoLayerParams, inp: ModelInput) -> nn.Module:
    return TwoLayer(int(np.prod(inp.shape)), p.width, inp.num_outputs)


def main(out: Path) -> RunResult:
    sites = write_sites(out / "sites")
    return fedmtl.run(
        {
            "name": "custom",
            "data": {"dataset": "sensor_sites", "dir": str(sites)},
            "model": {"name": "two_layer", "width": 32},
            "algorithm": {"name": "fedper"},
            "train": {"rounds": 15, "lr": 0.1},
            "output": {"progress": False},
        },
        out=out / "run",
    )


if __name__ == "__main__":
    where = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="fedmtl-custom-"))
    result = main(where)
    print(f"accuracy {result.final['accuracy_mean']:.3f}; run directory {result.run_dir}")
