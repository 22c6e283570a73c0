"""The throughput benchmark runs end to end in its smoke mode and writes its table and plot."""

from __future__ import annotations

import re
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
    rows = (
        "| fedmtl batched |",
        "| fedmtl sequential |",
        "| plain PyTorch loop, DataLoader |",
        "| plain PyTorch loop, tensor indexing |",
        "## Targets",
        "## Personalised algorithms: batched vs sequential, same workload",
        *(f"| {name} | " for name in throughput.PERSONALISED),
        "personalised, apfl: batched >= 3x faster per round than sequential",
        "Ditto's batched round within 2.5x of FedAvg's batched round",
    )
    for row in rows:
        assert row in text
    if throughput.onednn.available():  # the loop on the batched step's product route, for comparison
        assert "| plain PyTorch loop, tensor indexing, oneDNN products |" in text
        assert "oneDNN's float32 kernels" in text and "product shapes" in text
    assert "skipped (--quick or --no-flower)" in text
    assert "Accuracies agree to 0.00" in text  # same computation in every runner
    assert (tmp_path / "throughput_scaling.png").stat().st_size > 0
    assert "| digits 8x8, MLP 64-32-10 | 8 |" in text and "| MNIST, MLP 784-200-10 | 4 |" in text
    # every scaling row ends with the per-turn ratios: median and range
    assert re.search(r"\| digits 8x8, MLP 64-32-10 \| 8 \|.*\| [0-9.]+x \([0-9.]+-[0-9.]+x\) \|$", text, re.M)


def test_scaling_repeats_are_more_where_a_turn_is_cheap():
    assert [throughput.scaling_repeats(n) for n in (10, 1000, 1001, 10000)] == [9, 9, 5, 5]


def test_flower_row_is_skipped_with_a_note_when_flwr_is_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "flwr", None)  # import flwr -> ImportError
    work = SimpleNamespace(data=SimpleNamespace(num_clients=3))
    res = throughput.run_flower(work, tmp_path)  # type: ignore[arg-type]
    assert res.skipped
    assert "flwr is not installed" in res.note and "flwr[simulation]>=1.42,<1.43" in res.note


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


def test_dataloader_loop_trains_exactly_like_the_indexing_loop():
    """The two plain loops differ only in how batches are fetched: same batches, same weights."""
    import numpy as np
    import torch

    from flower_throughput_app import task

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(70, 784)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, 70))
    nets = [task.Net(hidden=16) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    a = task.train(nets[0], x, y, 1.0, 32, 0.1, task.client_rng(0, 1, 3))
    b = task.train_with_loader(nets[1], x, y, 1.0, 32, 0.1, task.client_rng(0, 1, 3))
    assert a == b
    for p, q in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(p, q)


def test_memory_probe_lifts_the_budget_into_one_stack(shared_data, monkeypatch):
    """The 'all clients in one stack' probe must really run with the lifted budget and caps."""
    import fedmtl.training.batched as batched_mod

    monkeypatch.setattr(batched_mod, "STEP_BYTES", batched_mod.STEP_BYTES)
    monkeypatch.setattr(batched_mod, "TENSOR_BYTES", batched_mod.TENSOR_BYTES)
    lifted = throughput.memory_probe(4, 16.0)
    assert lifted["budget_gib"] == 16.0 and lifted["groups"] == 1


def test_conv_section_replaces_only_its_own_part_of_the_table(tmp_path):
    import _throughput_conv as conv

    path = tmp_path / "throughput.md"
    path.write_text("# Throughput\n\nMLP rows\n\n## Targets\n\nt\n\n## Scaling: curve\n\ns\n")
    conv.splice_section(path, ["", conv.HEADING, "", "first"])
    assert path.read_text() == (
        "# Throughput\n\nMLP rows\n\n## Targets\n\nt\n\n"
        + conv.HEADING
        + "\n\nfirst\n\n## Scaling: curve\n\ns\n"
    )
    conv.splice_section(path, ["", conv.HEADING, "", "second", "", "### CNN", "", "table"])
    text = path.read_text()
    assert text.count(conv.HEADING) == 1 and "first" not in text
    assert text.startswith("# Throughput\n\nMLP rows\n\n## Targets\n\nt\n\n")
    assert text.endswith("second\n\n### CNN\n\ntable\n\n## Scaling: curve\n\ns\n")


@pytest.mark.slow
def test_conv_only_run_adds_cnn_and_lstm_tables_and_keeps_the_mlp_ones(tmp_path, shared_data, monkeypatch):
    import _throughput_conv as conv

    # the real workloads' models and runners on a few samples (one writer, one role)
    monkeypatch.setattr(conv, "WRITER_SAMPLES", (30, 40))
    monkeypatch.setattr(conv, "TEXT_SAMPLES", 30)
    mlp = "# Throughput\n\n## One round, side by side\n\n| fedmtl batched | 0.15 |\n\n"
    mlp += "## Scaling: x\n\ncurve\n"
    (tmp_path / "throughput.md").write_text(mlp)
    args = ["--only-conv", "--quick", "--conv-clients", "1", "--text-clients", "1", "--conv-rounds", "2"]
    out = throughput.main([*args, "--threads", "1", "--out", str(tmp_path)])
    text = out.read_text()
    assert text.startswith("# Throughput\n\n## One round, side by side\n\n| fedmtl batched | 0.15 |\n")
    assert text.endswith("## Scaling: x\n\ncurve\n")
    assert "Written by `fedmtl bench throughput --only-conv --quick" in text
    assert "### LEAF FEMNIST CNN, 1 clients" in text and "### LEAF Shakespeare LSTM, 1 clients" in text
    assert "| fedmtl batched | " in text and "| plain PyTorch loop, tensor indexing | " in text
    assert "no batching rule for `aten::lstm`" in text and "Incomplete" not in text
    assert "Paired turns (1: batched and sequential alternate" in text
    # one client: every runner trains the same mini-batches, so the accuracies agree
    assert text.count("Accuracies agree to 0.00") == 2
    assert "CNN, 1 clients: batched >= 40% of the measured convolution peak" in text
