"""The throughput benchmark runs end to end in its smoke mode and writes its table and plot."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
from benchmarks import throughput


def test_quick_benchmark_writes_table_and_scaling_plot(tmp_path, shared_data):
    out = throughput.main(
        [
            "--quick",
            "--clients",
            "2",
            "--rounds",
            "2",
            "--scaling",
            "4,8",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert out == tmp_path / "throughput.md"
    text = out.read_text()
    for row in ("| fedmtl batched |", "| fedmtl sequential |", "| plain PyTorch loop |", "## Targets"):
        assert row in text
    assert "skipped (--quick or --no-flower)" in text
    assert "Accuracies agree to 0.00" in text  # same computation in every runner
    assert (tmp_path / "throughput_scaling.png").stat().st_size > 0
    assert "| digits 8x8, MLP 64-32-10 | 8 |" in text and "| MNIST, MLP 784-200-10 | 4 |" in text


def test_flower_row_is_skipped_with_a_note_when_flwr_is_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "flwr", None)  # import flwr -> ImportError
    work = SimpleNamespace(data=SimpleNamespace(num_clients=3))
    res = throughput.run_flower(work, tmp_path)  # type: ignore[arg-type]
    assert res.skipped
    assert "flwr is not installed" in res.note and "flwr[simulation]>=1.41,<1.42" in res.note


@pytest.mark.parametrize("clients", [4, 40])
def test_scaling_federation_has_small_ragged_clients(clients, shared_data):
    from fedmtl.config import DataConfig, PartitionConfig
    from fedmtl.data import load_federated

    pool = load_federated(
        DataConfig(dataset="mnist", partition=PartitionConfig(kind="iid", num_clients=100), max_clients=2), 0
    )
    fed = throughput.small_federation(pool, clients)
    sizes = [c.n_train for c in fed.clients]
    assert len(sizes) == clients and all(20 <= n <= 50 for n in sizes)
