"""The throughput benchmark's convolutional and recurrent workloads: their data, arithmetic, the
machine's convolution peak, and their part of the report (``throughput.py`` runs the runners).

- **Convolutional**: FedAvg with LEAF's FEMNIST CNN (``model: {name: cnn, preset: femnist}``) on
  28x28 MNIST images packed as LEAF-like writers: each writer holds 80-374 images (uniform: mean
  227, as LEAF's FEMNIST writers have 227 on average), a Dirichlet(0.5) mix of the digits, 90% of
  them for training; every writer is sampled every round, 1 local epoch of SGD with batch 10 (the
  batch size of FedAvg's and LEAF's experiments with this model).
- **Recurrent**: FedAvg with LEAF's Shakespeare LSTM (``model: {name: rnn}``: 8-dimensional
  character embedding, 2 x 256 LSTM) on LEAF-format text: each "role" reads its own passage of
  English prose (the docstrings of Python's standard library, which ship with every Python),
  80-character windows and the next character, 80/20 train/test, batch 10.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from fedmtl.config import DataConfig, PartitionConfig
from fedmtl.data import load_federated
from fedmtl.data.federated import FederatedData

SEED = 0
#: FedAvg's B and LEAF's minibatch for these models
BATCH = 10
CONV_LR = 0.05
TEXT_LR = 0.8  # LEAF's Shakespeare learning rate
#: images per writer, train and test together (uniform: mean 227, LEAF FEMNIST's mean per writer)
WRITER_SAMPLES = (80, 374)
SEQ = 80
TEXT_SAMPLES = 150  # windows per role: 120 to train, 30 to test
#: modules whose docstrings make the text corpus (stdlib only: present wherever Python is)
CORPUS_MODULES = (
    "argparse", "collections", "json", "pathlib", "string", "textwrap", "zipfile", "ast", "asyncio",
    "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "fractions",
    "functools", "gettext", "heapq", "inspect", "io", "ipaddress", "itertools", "logging", "os",
    "pickle", "pprint", "random", "re", "shutil", "socket", "sqlite3", "statistics", "subprocess",
    "tarfile", "tempfile", "threading", "typing", "unittest", "urllib", "uuid", "warnings", "weakref",
)  # fmt: skip


# ------------------------------------------------------------------------------------ workloads


def fedmtl_config(model: dict[str, Any], data: dict[str, Any], lr: float) -> Callable[[str, int], dict]:
    """The fedmtl config factory (execution, rounds) of a workload."""

    def config(execution: str, rounds: int) -> dict[str, Any]:
        return {
            "name": f"throughput-{model['name']}-{execution}",
            "seed": SEED,
            "data": data,
            "model": model,
            "algorithm": {"name": "fedavg"},
            "train": {"rounds": rounds, "local_epochs": 1, "batch_size": BATCH, "lr": lr},
            "runtime": {"execution": execution},
            "output": {"progress": False},
        }

    return config


def writers(clients: int) -> FederatedData:
    """MNIST as LEAF-like writers (module docstring), all loaded through fedmtl."""
    return load_federated(
        DataConfig(
            dataset="mnist",
            test_fraction=0.1,
            partition=PartitionConfig(
                kind="resample", num_clients=clients, samples=WRITER_SAMPLES, alpha=0.5
            ),
        ),
        SEED,
    )


def corpus() -> str:
    import importlib

    texts = []
    for name in CORPUS_MODULES:
        doc = importlib.import_module(name).__doc__ or ""
        texts.append(" ".join(doc.split()))
    return " ".join(texts)


def text_roles(root: Path, clients: int) -> Path:
    """A LEAF Shakespeare-format data directory (``train/`` and ``test/`` JSON): ``clients`` roles,
    each reading its own passage of ``corpus()``."""
    text = corpus()
    span = (len(text) - SEQ - 1) // clients
    if span < TEXT_SAMPLES:
        raise ValueError(f"the corpus ({len(text)} characters) is too short for {clients} roles")
    for split in ("train", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
    docs = {s: {"users": [], "num_samples": [], "user_data": {}} for s in ("train", "test")}
    for r in range(clients):
        start = r * span
        xs = [text[i : i + SEQ] for i in range(start, start + TEXT_SAMPLES)]
        ys = [text[i + SEQ] for i in range(start, start + TEXT_SAMPLES)]
        cut = int(0.8 * TEXT_SAMPLES)
        user = f"ROLE_{r:03d}"
        for split, (x, y) in (("train", (xs[:cut], ys[:cut])), ("test", (xs[cut:], ys[cut:]))):
            docs[split]["users"].append(user)
            docs[split]["num_samples"].append(len(y))
            docs[split]["user_data"][user] = {"x": x, "y": y}
    for split, doc in docs.items():
        (root / split / f"all_data_niid_0_{split}.json").write_text(json.dumps(doc))
    return root


def text_data(root: Path) -> FederatedData:
    return load_federated(DataConfig(dataset="leaf", file=str(root)), SEED)


# ------------------------------------------------------------------------------------ arithmetic


def femnist_flops_per_sample(classes: int, size: int = 28) -> float:
    """FLOPs of one training image through LEAF's FEMNIST CNN as every runner executes them: each
    layer's forward product and weight gradient, and the input gradient of every layer but the
    first convolution (no one needs d loss / d pixels). Pooling, ReLUs and the loss are under 1%
    and not counted."""
    h = size
    layers = [h * h * 32 * 25 * 1, (h // 2) ** 2 * 64 * 32 * 25, (h // 4) ** 2 * 64 * 2048, 2048 * classes]
    macs = 2 * sum(layers) + sum(layers[1:])
    return 2.0 * macs


def lstm_flops_per_sample(seq: int, vocab: int, classes: int, embed: int = 8, hidden: int = 256) -> float:
    """FLOPs of one training sequence through LEAF's 2-layer LSTM: per token and layer the gate
    products (4 x hidden x (input + hidden) multiply-adds) forward, for the weight gradients and
    for the input gradients (all needed: the embedding trains), and the head once per sequence."""
    per_token = 4 * hidden * (embed + hidden) + 4 * hidden * (2 * hidden)
    return 2.0 * 3 * (seq * per_token + hidden * classes)


def conv_peak(repeats: int = 3) -> dict[str, Any]:
    """The machine's convolution route at its best: GFLOP/s of large float32 ``conv2d`` calls
    (forward, this process's threads, torch's default route: oneDNN on x86), over a few shapes
    that fill it (LEAF's second convolution at a large batch, and two others), in both memory
    layouts; the best one, and each one's."""
    shapes = [(512, 32, 64, 14, 5), (256, 64, 64, 28, 3), (256, 64, 128, 14, 5)]
    out: dict[str, Any] = {"each": {}}
    for n, cin, cout, size, k in shapes:
        x = torch.randn(n, cin, size, size)
        w = torch.randn(cout, cin, k, k)
        flops = 2.0 * n * cout * cin * k * k * size * size
        for layout in ("contiguous", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            xi, wi = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
            F.conv2d(xi, wi, padding=k // 2)
            best = math.inf
            for _ in range(repeats):
                t = time.perf_counter()
                F.conv2d(xi, wi, padding=k // 2)
                best = min(best, time.perf_counter() - t)
            out["each"][f"{n}x{cin}x{size}x{size} -> {cout}, {k}x{k}, {layout}"] = flops / best / 1e9
    best_key = max(out["each"], key=out["each"].get)
    out["peak"], out["shape"] = out["each"][best_key], best_key
    return out


def best_conv_peaks(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two ``conv_peak`` measurements merged: each shape's better one."""
    each = {k: max(v, b["each"].get(k, 0.0)) for k, v in a["each"].items()}
    best = max(each, key=each.get)
    return {"each": each, "peak": each[best], "shape": best}


# ------------------------------------------------------------------------------------ report


def _ratio(a: float, b: float) -> str:
    return "—" if not (a == a and b == b) or b <= 0 else f"{a / b:.2f}x"


def report_lines(sections: list[dict[str, Any]], peaks: dict[str, Any], matmul_peak: float) -> list[str]:
    """The section of ``throughput.md``: one table per workload, then the targets."""
    peak = peaks["peak"]
    lines = [
        "",
        "## Convolutional and recurrent federations",
        "",
        "FedAvg with the literature's models, every runner side by side in one run (one pass each). "
        "**CNN**: LEAF's FEMNIST CNN (`model: {name: cnn, preset: femnist}`: 5x5 convolutions of 32 and "
        "64 filters, 2x2 pooling, a 2048-unit layer; 6.5 million parameters at 10 classes) on 28x28 "
        f"MNIST images packed as LEAF-like writers ({WRITER_SAMPLES[0]}-{WRITER_SAMPLES[1]} images each, "
        "mean 227 as LEAF's FEMNIST writers, a Dirichlet(0.5) digit mix, 90% for training), every "
        f"writer every round, 1 local epoch, batch {BATCH} (FedAvg's and LEAF's B), SGD lr {CONV_LR}. "
        "**LSTM**: LEAF's Shakespeare model (`model: {name: rnn}`: 8-dimensional character embedding, "
        "2 x 256 LSTM) on LEAF-format text, each role its own passage of English prose (the docstrings "
        f"of Python's standard library), {SEQ}-character windows, {TEXT_SAMPLES} per role (80% to "
        f"train), batch {BATCH}, SGD lr {TEXT_LR} (LEAF's). The plain loop and Flower's ClientApp train "
        "the same model written in plain PyTorch (`benchmarks/flower_throughput_app/task.py`) on the "
        "same mini-batches.",
        "",
        f"- Convolution peak measured in this run: {peak:.1f} GFLOP/s (float32 `conv2d` forward, best of "
        f"3 before and 3 after the runners, over {len(peaks['each'])} large shapes and layouts; the best "
        f"was {peaks['shape']}). Matmul peak (above): {matmul_peak:.1f} GFLOP/s.",
        "- GFLOP/s counts the arithmetic the workload needs (every layer's forward product and weight "
        "gradient, every input gradient but the first convolution's), divided by the steady round "
        "time. fedmtl batched reassociates the dense layer's products (low-rank updates of the "
        "broadcast weight, `docs/batched.md`) and executes the same number of operations in fewer, "
        "larger products.",
    ]
    targets: list[tuple[str, float, float, str]] = []
    for sec in sections:
        res = sec["results"]
        work = sec["work"]
        gflop = work.flops_per_round / 1e9
        ref_peak = peak if sec["kind"] == "cnn" else matmul_peak
        lines += [
            "",
            f"### {sec['label']}",
            "",
            f"{work.samples_per_round:,} training samples per round, {gflop:,.0f} GFLOP per round "
            f"({work.flops_per_sample / 1e6:.1f} MFLOP per sample), {work.rounds} rounds.",
            "",
            "| runner | s/round (steady: best of rounds 2+) | round 1 (s) | end to end (s) | accuracy | "
            f"GFLOP/s | % of the {'convolution' if sec['kind'] == 'cnn' else 'matmul'} peak | "
            "batched is, per round |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        batched = res["batched"]
        for r in res.values():
            if r.skipped:
                lines.append(f"| {r.name} | — | — | — | — | — | — | — |")
                continue
            rate = gflop / r.steady
            faster = "" if r is batched else _ratio(r.steady, batched.steady)
            lines.append(
                f"| {r.name} | {r.steady:.3f} | {r.rounds[0]:.3f} | {r.end_to_end:.1f} | {r.accuracy:.4f} | "
                f"{rate:.1f} | {100 * rate / ref_peak:.0f}% | {faster} |"
            )
        notes = [f"- {r.name}: {r.note}" for r in res.values() if r.note]
        accs = [r.accuracy for r in res.values() if not r.skipped]
        spread = max(accs) - min(accs)
        lines += ["", *notes, *([""] if notes else []), f"Accuracies agree to {spread:.4f}."]
        turns = sec.get("turns")
        paired = None
        if turns:
            b, s = turns["batched"], turns["sequential"]
            per_turn = sorted(q / p for p, q in zip(b, s, strict=True))
            paired = per_turn[len(per_turn) // 2]
            lines += [
                "",
                f"Paired turns ({len(b)}: batched and sequential alternate, two rounds each, the second "
                "timed, so a neighbour's load falls on both): batched "
                + ", ".join(f"{t:.2f}" for t in b)
                + " s, sequential "
                + ", ".join(f"{t:.2f}" for t in s)
                + f" s per round; sequential / batched per turn: median {paired:.2f}x "
                f"(range {per_turn[0]:.2f}-{per_turn[-1]:.2f}x).",
            ]
        if sec["kind"] == "lstm":
            lines += [
                "",
                "`torch.func.vmap` has no batching rule for `aten::lstm` (fedmtl's batched step and "
                "`batch_support` fail on it), so `execution: auto` trains LEAF's LSTM client by client, as "
                "`sequential` does; the batched row measures that path (`docs/batched.md`).",
            ]
        if sec["kind"] != "cnn" or batched.skipped:
            continue
        n = work.data.num_clients
        share = 100 * (gflop / batched.steady) / peak
        if n == 20:
            targets.append((f"CNN, {n} clients: batched >= 3x faster per round than sequential",
                            res["sequential"].steady / batched.steady, 3.0, "x"))  # fmt: skip
            if paired is not None:
                targets.append((f"CNN, {n} clients: the same, paired turns (median)", paired, 3.0, "x"))
            targets.append((f"CNN, {n} clients: batched >= 3x faster per round than the plain loop",
                            res["plain"].steady / batched.steady, 3.0, "x"))  # fmt: skip
        targets.append(
            (f"CNN, {n} clients: batched >= 40% of the measured convolution peak", share, 40.0, "%")
        )
        targets.append((f"CNN, {n} clients: the same accuracy for every runner (spread <= 0.005)",
                         spread, 0.005, "<="))  # fmt: skip
    if targets:
        lines += ["", "### Targets (convolutional)", "", "| target | measured | met |", "|---|---:|:---:|"]
        for label, value, goal, unit in targets:
            if unit == "<=":
                met, shown = value <= goal, f"{value:.4f}"
            else:
                met = value >= goal
                shown = f"{value:.1f}%" if unit == "%" else f"{value:.2f}x"
            lines.append(f"| {label} | {shown} | {'yes' if met else '**no**'} |")
    return lines


#: the heading ``report_lines`` writes (``splice_section`` replaces the section it starts)
HEADING = "## Convolutional and recurrent federations"


def splice_section(path: Path, lines: list[str]) -> None:
    """Write the section (``report_lines``, a leading blank line included) into ``path`` in place
    of the one there, else before its scaling section, else at its end; the rest stays as written."""
    section = "\n".join(lines[1:]).rstrip("\n") + "\n"
    text = path.read_text() if path.exists() else "# Throughput\n"
    start = text.find(f"\n{HEADING}\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        end = len(text) if end < 0 else end
        text = text[: start + 1] + section + text[end:]
    else:
        at = text.find("\n## Scaling")
        at = len(text) if at < 0 else at
        text = text[:at].rstrip("\n") + "\n\n" + section + text[at:]
    path.write_text(text)
