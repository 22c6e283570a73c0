"""Throughput of one FedAvg round: fedmtl batched vs fedmtl sequential vs a plain PyTorch loop vs Flower.

``fedmtl bench throughput [--quick]`` writes ``benchmarks/results/throughput.md`` and
``benchmarks/results/throughput_scaling.png``.

Workload (issue 3): FedAvg on MNIST, 100 IID clients, all sampled, 1 local epoch of SGD with batch
32, MLP 784-200-10, 5 rounds. Every runner gets the same client arrays, the same initial weights
and the same mini-batches (each client's batch order is fedmtl's hash of (seed, 3, round, client),
``fedmtl.training.shuffle``), so they do the same arithmetic and must reach the same accuracy.
Per-round times cover local training and aggregation; central evaluation on the 10,000 MNIST test
images runs once, after the last round, and counts in the end-to-end time.

The scaling curve times one round for 10 to 10,000 sampled clients holding 20-50 images each, in
two regimes: 8x8 digits with an MLP 64-32-10, where per-client overhead dominates, and MNIST with
the 784-200-10 MLP (up to 1,000 clients), where arithmetic dominates. Clients draw their images
from the pool without replacement, so large federations share images.
"""

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # flower_throughput_app is imported as a package, like a Flower app
    sys.path.insert(0, str(HERE))

import _provenance as provenance  # noqa: E402
import _throughput_conv as conv  # noqa: E402
import fedmtl.experiment.run as fedmtl_run  # noqa: E402
import fedmtl.training.batched as batched_mod  # noqa: E402
from fedmtl.config import DataConfig, PartitionConfig, parse_config  # noqa: E402
from fedmtl.data import load_federated  # noqa: E402
from fedmtl.data.federated import ClientData, FederatedData  # noqa: E402
from fedmtl.experiment.evaluate import evaluate_global  # noqa: E402
from fedmtl.models import build_model  # noqa: E402
from fedmtl.training import onednn  # noqa: E402
from fedmtl.training.tensors import model_arrays  # noqa: E402
from flower_throughput_app import task  # noqa: E402

SEED = 0
LR = 0.1
BATCH = 32
HIDDEN = 200
TEST_FRACTION = 0.01  # fedmtl keeps a per-client test split; 1% leaves 59,400 images for training


# ------------------------------------------------------------------------------------ records


@dataclass
class RunnerResult:
    name: str
    rounds: list[float] = field(default_factory=list)
    end_to_end: float = float("nan")
    accuracy: float = float("nan")
    clients: int = 0
    note: str = ""
    load: float = float("nan")  # 1-minute load average when the runner started

    @property
    def steady(self) -> float:
        """Fastest round after the first (start-up, lazy imports and caches land in round 1): on a
        shared machine the least disturbed round is the best estimate of the runner's own cost."""
        later = self.rounds[1:] or self.rounds
        return float(min(later)) if later else float("nan")

    @property
    def median(self) -> float:
        later = self.rounds[1:] or self.rounds
        return float(np.median(later)) if later else float("nan")

    @property
    def skipped(self) -> bool:
        return not self.rounds


@dataclass
class Workload:
    data: FederatedData
    rounds: int
    #: FLOPs one training image costs as executed (see ``executed_flops_per_sample``)
    flops_per_sample: float
    init: dict[str, np.ndarray]
    #: the usual convention, 3x the forward pass (what the issue's "about 57 GFLOP" counts)
    conventional_flops_per_sample: float = float("nan")
    #: fedmtl's config for (execution, rounds); None: the MLP workload's (``fedmtl_config``)
    config: Callable[[str, int], dict[str, Any]] | None = None
    #: the plain loop's and Flower's model, as ``task.make_net`` takes it
    net: dict[str, Any] = field(default_factory=lambda: {"kind": "mlp", "hidden": HIDDEN})
    batch: int = BATCH
    lr: float = LR

    def fedmtl_config(self, execution: str) -> dict[str, Any]:
        if self.config is not None:
            return self.config(execution, self.rounds)
        return fedmtl_config(execution, [HIDDEN], self.rounds)

    @property
    def samples_per_round(self) -> int:
        return int(sum(c.n_train for c in self.data.clients))

    @property
    def flops_per_round(self) -> float:
        return self.samples_per_round * self.flops_per_sample


def executed_flops_per_sample(widths: list[int]) -> float:
    """FLOPs of one training image through an MLP with layer widths ``widths`` (input first), as
    every runner here executes them: the forward product and the weight gradient of every layer,
    and the input gradient of every layer but the first (nobody computes d loss / d pixels).
    Biases, activations and the loss are a fraction of a percent and not counted."""
    pairs = list(zip(widths, widths[1:], strict=False))
    forward = sum(2 * a * b for a, b in pairs)
    return float(2 * forward + sum(2 * a * b for a, b in pairs[1:]))


# ------------------------------------------------------------------------------------ helpers


def fedmtl_config(execution: str, hidden: list[int], rounds: int) -> dict[str, Any]:
    return {
        "name": f"throughput-{execution}",
        "seed": SEED,
        "data": {"dataset": "mnist", "test_fraction": TEST_FRACTION, "normalize": "scale"},
        "model": {"name": "mlp", "hidden": hidden} if hidden else {"name": "linear"},
        "algorithm": {"name": "fedavg"},
        "train": {"rounds": rounds, "local_epochs": 1, "batch_size": BATCH, "lr": LR},
        "runtime": {"execution": execution},
        "output": {"progress": False},
    }


@contextlib.contextmanager
def given_data(data: FederatedData) -> Iterator[None]:
    """Make fedmtl's ``build`` use already-loaded data, so no runner pays for reading MNIST."""
    with mock.patch.object(fedmtl_run, "load_federated", lambda *_a, **_k: data):
        yield


def matmul_peak(n: int, repeats: int = 5) -> float:
    """Best GFLOP/s of an n x n float32 matmul with this process's threads (torch's default route)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.matmul(a, b, out=out)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def matmul_peaks(n: int) -> dict[str, Any]:
    """The matmul peak by both routes torch has for float32 (its default, MKL on x86, and oneDNN's
    kernels, which fedmtl's batched step takes where they are exact float32); the machine's peak is
    the faster route that is exact."""
    out: dict[str, Any] = {"default": matmul_peak(n), "onednn": float("nan"), "onednn_exact": False}
    if onednn.available():
        a, b, c = torch.empty(n, n), torch.empty(n, n), torch.empty(n, n)
        out["onednn_exact"] = onednn.exact([("matmul", a, b, c)])
        with onednn.route():
            out["onednn"] = matmul_peak(n)
    return _with_peak(out)


def _with_peak(peaks: dict[str, Any]) -> dict[str, Any]:
    """``peaks`` with ``peak`` set: the faster route that is exact float32."""
    usable = [peaks["default"]] + ([peaks["onednn"]] if peaks["onednn_exact"] else [])
    return {**peaks, "peak": max(usable)}


def best_peaks(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two ``matmul_peaks`` measurements merged: each route's better one."""
    out = dict(a)
    for route in ("default", "onednn"):
        out[route] = max(a[route], b[route]) if not math.isnan(a[route]) else b[route]
    return _with_peak(out)


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not ``getrusage``'s ru_maxrss: that survives
    exec, so a probe started from a big parent process reports the parent's size."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


# ------------------------------------------------------------------------------------ runners


def run_fedmtl(work: Workload, execution: str) -> RunnerResult:
    """fedmtl's simulator, rounds timed around ``Simulator.run_round`` (train + aggregate)."""
    res = RunnerResult(f"fedmtl {execution}", clients=work.data.num_clients)
    t0 = time.perf_counter()
    cfg = parse_config(work.fedmtl_config(execution))
    with given_data(work.data):
        _, algo, sim = fedmtl_run.build(cfg)
    server, states = algo.init_server(), {}
    for r in range(1, work.rounds + 1):
        t = time.perf_counter()
        server = sim.run_round(r, server, states).server
        res.rounds.append(time.perf_counter() - t)
    res.accuracy = evaluate_global(algo, server, work.data)["global_accuracy"]
    res.end_to_end = time.perf_counter() - t0
    return res


def run_plain(work: Workload, loader: bool = False, dnn: bool = False) -> RunnerResult:
    """A per-client loop in plain PyTorch: one nn.Module, a fresh torch.optim.SGD per client,
    clients one after another, a weighted average of state dicts. ``loader``: mini-batches from a
    DataLoader (the usual research-code way), else by indexing the client's tensors (tuned).
    ``dnn``: every product of the loop on oneDNN's kernels, the route fedmtl's batched step takes."""
    if dnn:
        with onednn.route():
            res = run_plain(work, loader)
        res.name += ", oneDNN products"
        return res
    name = "plain PyTorch loop, DataLoader" if loader else "plain PyTorch loop, tensor indexing"
    train = task.train_with_loader if loader else task.train
    res = RunnerResult(name, clients=work.data.num_clients)
    t0 = time.perf_counter()
    net = task.make_net(work.net)
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in work.init.items()})
    clients = [(torch.from_numpy(c.x_train), torch.from_numpy(c.y_train)) for c in work.data.clients]
    weights = np.array([len(y) for _, y in clients], dtype=np.float64)
    weights /= weights.sum()
    global_state = {k: v.clone() for k, v in net.state_dict().items()}
    for r in range(1, work.rounds + 1):
        t = time.perf_counter()
        avg = {k: torch.zeros_like(v) for k, v in global_state.items()}
        for cid, (x, y) in enumerate(clients):
            net.load_state_dict(global_state)
            train(net, x, y, 1.0, work.batch, work.lr, task.client_rng(SEED, r, cid))
            for k, v in net.state_dict().items():
                avg[k] += float(weights[cid]) * v
        global_state = avg
        res.rounds.append(time.perf_counter() - t)
    net.load_state_dict(global_state)
    x_test, y_test = work.data.x_global_test, work.data.y_global_test
    assert x_test is not None and y_test is not None
    res.accuracy = task.accuracy(net, torch.from_numpy(x_test), torch.from_numpy(y_test))
    res.end_to_end = time.perf_counter() - t0
    return res


def run_flower(work: Workload, tmp: Path) -> RunnerResult:
    """Flower's in-process simulation (Ray backend, one CPU per ClientApp) on the same workload."""
    res = RunnerResult("Flower run_simulation", clients=work.data.num_clients)
    try:
        import flwr
        from flwr.simulation import run_simulation
    except ImportError:
        res.note = "skipped: flwr is not installed (pip install 'flwr[simulation]>=1.42,<1.43')"
        return res
    res.name = f"Flower {flwr.__version__} run_simulation"
    data_path, init_path = tmp / "federation.npz", tmp / "init.npz"
    clients = work.data.clients
    assert work.data.x_global_test is not None and work.data.y_global_test is not None
    task.save_federation(
        str(data_path),
        [c.x_train for c in clients],
        [c.y_train for c in clients],
        work.data.x_global_test,
        work.data.y_global_test,
    )
    np.savez(init_path, **work.init)
    settings = {
        "num-server-rounds": work.rounds,
        "num-clients": len(clients),
        "epochs": 1.0,
        "batch-size": work.batch,
        "lr": work.lr,
        "seed": SEED,
        "data-path": str(data_path),
        "init-path": str(init_path),
        "model": json.dumps(work.net),
    }
    env = {
        "FEDMTL_FLOWER_BENCH": json.dumps(settings),
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
        # Ray workers are new processes: they import the ClientApp's module from here.
        "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p),
    }
    from flower_throughput_app import client_app, server_app

    server_app.ROUND_END.clear()
    server_app.RESULT.clear()
    with _environ(env), _quiet_flower():
        t0 = time.perf_counter()
        run_simulation(
            server_app=server_app.app,
            client_app=client_app.app,
            num_supernodes=len(clients),
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
        res.end_to_end = time.perf_counter() - t0
    # The ClientApp actors keep a core busy for up to half a second after run_simulation returns;
    # let them exit before the next runner starts timing.
    time.sleep(1.0)
    ends = server_app.ROUND_END
    if len(ends) != work.rounds + 1 or "accuracy" not in server_app.RESULT:
        res.note = f"failed: the ServerApp finished {max(len(ends) - 1, 0)} of {work.rounds} rounds"
        return res
    res.rounds = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    res.accuracy = server_app.RESULT["accuracy"]
    res.note = (
        f"round 1 includes starting Ray and the ClientApp actors ({res.rounds[0] - res.steady:.1f} s "
        "more than a steady round)"
    )
    return res


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet_flower() -> Iterator[None]:
    import logging

    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


# ------------------------------------------------------------------------------------ scaling


def small_federation(pool: FederatedData, num_clients: int, seed: int = SEED) -> FederatedData:
    """``num_clients`` clients with 20-50 training images each, drawn from ``pool``'s images
    (without replacement within a client; large federations share images)."""
    x = np.concatenate([c.x_train for c in pool.clients])
    y = np.concatenate([c.y_train for c in pool.clients])
    rng = np.random.default_rng([seed, 7, num_clients])
    clients = []
    for cid, n in enumerate(rng.integers(20, 51, num_clients)):
        idx = rng.choice(len(y), int(n), replace=False)
        clients.append(
            ClientData(cid, x[idx], y[idx], x[idx[:2]], y[idx[:2]], pool.task, f"client_{cid:05d}")
        )
    return FederatedData(
        f"{pool.name}-{num_clients}",
        clients,
        pool.input_shape,
        pool.task,
        pool.x_global_test,
        pool.y_global_test,
    )


def timed_turns(
    data: FederatedData,
    executions: list[str],
    hidden: list[int],
    repeats: int,
    algorithm: dict[str, Any] | None = None,
) -> dict[str, list[float]]:
    """``repeats`` timed rounds of ``algorithm`` (default FedAvg) on ``data`` (every client
    sampled) for each execution.

    The executions take turns (a pair of rounds of each, then the next pair of each), so a change
    in the shared machine's speed during the measurement falls on all of them rather than on
    whichever ran later; the fastest round is the least disturbed. Only the second round of each
    pair is timed: the first brings back the caches, allocator pools and thread state that the
    other execution's rounds displaced, so each timed round runs as in a run of its own (a
    1,000-client batched round timed right after a sequential one measured about 15% slower)."""
    runs = []
    for execution in executions:
        raw = fedmtl_config(execution, hidden, 2 * repeats)
        raw["data"]["dataset"] = data.name.split("-")[0]
        if algorithm is not None:
            raw["algorithm"] = algorithm
        with given_data(data):
            _, algo, sim = fedmtl_run.build(parse_config(raw))
        runs.append([sim, algo.init_server(), {}])
    return _paired_turns(runs, executions, repeats)


@dataclass
class ScalingWorkload:
    """One curve: a pool of images that clients draw 20-50 each from, and a model."""

    label: str
    pool: FederatedData
    hidden: list[int]
    max_clients: int

    @property
    def flops_per_sample(self) -> float:
        return executed_flops_per_sample([int(np.prod(self.pool.input_shape)), *self.hidden, 10])


def scaling_repeats(clients: int) -> int:
    """Timed turns for a scaling point: more where a turn is cheap (a 10,000-client sequential
    round takes seconds), so each execution's fastest round is less likely to fall in a busy phase."""
    return 9 if clients <= 1000 else 5


def speedups(turns: dict[str, list[float]]) -> dict[str, Any]:
    """Each execution's fastest round, batched's speed-up, and each turn's: sequential's round over
    the batched round just before it (their spread shows how far the shared machine's speed moved
    the ratio during the measurement)."""
    out: dict[str, Any] = {e: min(v) for e, v in turns.items()}
    out["speedup"] = out["sequential"] / out["batched"]
    out["turn_speedups"] = sorted(s / b for b, s in zip(turns["batched"], turns["sequential"], strict=True))
    return out


def scaling_curve(workloads: list[ScalingWorkload], sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for w in workloads:
        warm = small_federation(w.pool, 4)
        timed_turns(warm, ["batched", "sequential"], w.hidden, 1)  # warm-up: lazy imports, first calls
        for n in sizes:
            if n > w.max_clients:
                continue
            data = small_federation(w.pool, n)
            row = {"model": w.label, "clients": n, "samples": int(sum(c.n_train for c in data.clients))}
            row["gflop"] = row["samples"] * w.flops_per_sample / 1e9
            row.update(speedups(timed_turns(data, ["batched", "sequential"], w.hidden, scaling_repeats(n))))
            rows.append(row)
            print(f"  scaling {w.label}, {n:>6} clients: {row['batched']:.3f} s batched, "
                  f"{row['sequential']:.3f} s sequential ({row['speedup']:.1f}x)", flush=True)  # fmt: skip
    return rows


#: The personalised algorithms timed batched vs sequential on the side-by-side workload, with their
#: default hyper-parameters (FedRep: 5 head epochs and 1 body epoch per round), FedAvg as reference.
PERSONALISED = ["fedavg", "ditto", "fedper", "fedrep", "apfl", "lg_fedavg", "fedbabu"]


def personalised_turns(data: FederatedData, repeats: int) -> list[dict[str, Any]]:
    """Seconds per round, batched and sequential (fastest of ``repeats`` turns), per algorithm."""
    rows = []
    for name in PERSONALISED:
        turns = timed_turns(data, ["batched", "sequential"], [HIDDEN], repeats, {"name": name})
        row: dict[str, Any] = {"algorithm": name, **speedups(turns)}
        rows.append(row)
        print(f"  personalised {name}: {row['batched']:.3f} s batched, {row['sequential']:.3f} s sequential "
              f"({row['speedup']:.1f}x)", flush=True)  # fmt: skip
    return rows


def plot_scaling(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = {"batched": "tab:blue", "sequential": "tab:orange"}
    styles = ["-", "--", ":"]
    for m, label in enumerate(dict.fromkeys(r["model"] for r in rows)):
        part = [r for r in rows if r["model"] == label]
        for execution, color in colors.items():
            ax.plot(
                [r["clients"] for r in part],
                [r[execution] for r in part],
                styles[m % len(styles)],
                marker="o",
                color=color,
                label=f"{execution}, {label}",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sampled clients per round (20-50 images each)")
    ax.set_ylabel("seconds per round")
    ax.set_title("fedmtl FedAvg round time vs federation size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------ memory


def memory_probe(num_clients: int, budget_gib: float | None) -> dict[str, Any]:
    """One batched FedAvg round of ``num_clients`` sampled MNIST clients (784-200-10 MLP), in this
    process; returns resident-set sizes in MiB. Meant to run in a fresh subprocess."""
    cfg = parse_config(
        {
            **fedmtl_config("batched", [HIDDEN], 1),
            "data": {
                "dataset": "mnist",
                "test_fraction": TEST_FRACTION,
                "partition": {"kind": "iid", "num_clients": num_clients},
            },
        }
    )
    if budget_gib is not None:  # one stack: lift the memory budget and the per-step caps
        cfg.runtime.batch_memory_gib = budget_gib
        batched_mod.STEP_BYTES = batched_mod.TENSOR_BYTES = int(budget_gib * 2**30)
    data, algo, sim = fedmtl_run.build(cfg)
    groups: list[int] = []
    real_groups = batched_mod._groups

    def counting(*a: Any) -> list[list[int]]:
        out = real_groups(*a)
        groups.append(len(out))
        return out

    server, states = algo.init_server(), {}
    before = current_rss_mib()
    peak_before = peak_rss_mib()
    t = time.perf_counter()
    with mock.patch.object(batched_mod, "_groups", counting):
        server = sim.run_round(1, server, states).server
    seconds = time.perf_counter() - t
    return {
        "clients": num_clients,
        "groups": sum(groups),
        "budget_gib": sim.executor.memory_bytes / 2**30,
        "rss_before_mib": before,
        "peak_before_mib": peak_before,
        "peak_mib": peak_rss_mib(),
        "seconds": seconds,
        "params_mib": sum(v.nbytes for v in algo.init_server()["params"].values()) * num_clients / 2**20,
    }


def run_memory_probe(num_clients: int, budget_gib: float | None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", str(num_clients)]
    if budget_gib is not None:
        cmd += ["--budget-gib", str(budget_gib)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"clients": num_clients, "error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ report


def _fmt(x: float, digits: int = 2) -> str:
    return "—" if x != x else f"{x:.{digits}f}"


def _ratio(a: float, b: float) -> str:
    return "—" if not (a == a and b == b) or b <= 0 else f"{a / b:.1f}x"


def write_report(
    path: Path,
    args: argparse.Namespace,
    work: Workload,
    peak: float,
    results: dict[str, RunnerResult],
    scaling: list[dict[str, Any]],
    memory: list[dict[str, Any]],
    env: dict[str, Any],
    personalised: list[dict[str, Any]] | None = None,
    sections: list[dict[str, Any]] | None = None,
) -> None:
    batched, seq, plain, loader, flower = (
        results[k] for k in ("batched", "sequential", "plain", "loader", "flower")
    )
    # the tuned loop: the faster of tensor indexing on torch's default products and on oneDNN's
    tuned = min([r for k, r in results.items() if k in ("plain", "plain_dnn")], key=lambda r: r.steady)
    peaks = env["peaks"]
    exact_routed, probed = env.get("route", (0, 0))
    gflop = work.flops_per_round / 1e9
    lines = [
        "# Throughput: FedAvg on MNIST, fedmtl batched vs sequential vs plain PyTorch vs Flower",
        "",
        f"Written by `fedmtl bench throughput{' --quick' if args.quick else ''}` on {env['date']} at "
        f"commit {env['commit']}.",
        "",
        f"- Machine: {env['cpu']}, {env['cores']} cores, torch {env['torch']} ({env['threads']} threads, "
        f"OMP_WAIT_POLICY={env['omp']}), Python {env['python']}, {env['flwr']}.",
        f"- Load average (1 min) at start / end: {env['load_start']:.2f} / {env['load_end']:.2f} "
        "(other processes on the machine slow every runner; ratios are more stable than seconds).",
        f"- Workload: FedAvg, MNIST, {work.data.num_clients} IID clients, all sampled, 1 local epoch, "
        f"batch {BATCH}, SGD lr {LR}, MLP 784-{HIDDEN}-10, {work.rounds} rounds; "
        f"{work.samples_per_round:,} training images "
        f"per round, {gflop:.1f} GFLOP of training per round as executed "
        f"({work.flops_per_sample / 1e6:.3f} MFLOP per image: forward, weight gradients, and input "
        "gradients below the first layer; "
        f"{work.samples_per_round * work.conventional_flops_per_sample / 1e9:.1f} GFLOP by the usual "
        "3x-the-forward-pass count, which includes an input gradient of the first layer that no "
        "runner computes). GFLOP/s, % of peak and the ceilings below use the executed count.",
        f"- Matmul peak measured in this run: {peak:.1f} GFLOP/s (float32 {env['peak_n']}x{env['peak_n']} "
        f"matmul, best of 5 before and 5 after the runners, the faster exact route: torch's default "
        f"products {peaks['default']:.1f} GFLOP/s, oneDNN's float32 kernels "
        f"{_fmt(peaks['onednn'], 1)} GFLOP/s"
        f"{'' if peaks['onednn_exact'] else ' (not exact float32 here: not used)'}).",
        "- Products: torch's default route for float32 on x86 is MKL, which on this CPU runs its AVX2 "
        "code; oneDNN (inside torch) has AVX-512 float32 kernels. fedmtl's batched step sends its "
        f"products of at least {onednn.MIN_ROUTED_MACS / 1e6:g} million multiply-adds there (smaller "
        "ones are faster on MKL), and only for shapes where a probe matches a float64 reference to "
        f"float32 accuracy (`fedmtl.training.onednn`; this run: {exact_routed} of {probed} probed "
        "product shapes exact and routed). The plain loop is shown on both routes; 'tuned loop' "
        "below is the faster of the two.",
        "",
        "## One round, side by side",
        "",
        "| runner | s/round (steady: best of rounds 2+) | median (s) | round 1 (s) | client updates/s | "
        f"end to end, {work.rounds} rounds (s) | accuracy after {work.rounds} rounds | GFLOP/s | "
        "% of matmul peak | load avg at start |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        if r.skipped:
            lines.append(f"| {r.name} | — | — | — | — | — | — | — | — | — |")
            continue
        rate = gflop / r.steady
        lines.append(
            f"| {r.name} | {r.steady:.3f} | {r.median:.3f} | {r.rounds[0]:.3f} | "
            f"{r.clients / r.steady:,.0f} | {r.end_to_end:.2f} | {r.accuracy:.4f} | {rate:.1f} | "
            f"{100 * rate / peak:.0f}% | {r.load:.1f} |"
        )
    notes = [f"- {r.name}: {r.note}" for r in results.values() if r.note]
    if notes:
        lines += ["", *notes]
    accs = [r.accuracy for r in results.values() if not r.skipped]
    lines += [
        "",
        f"Accuracies agree to {max(accs) - min(accs):.4f} (same data, initial weights, mini-batches and "
        "hyper-parameters; only the order of float sums differs).",
        "",
        "## How many times faster fedmtl batched is",
        "",
        "| batched vs | per round (steady) | end to end |",
        "|---|---:|---:|",
    ]
    others = [seq, loader, plain] + [results[k] for k in ("plain_dnn",) if k in results] + [flower]
    for other in others:
        per_round = _ratio(other.steady, batched.steady)
        lines.append(f"| {other.name} | {per_round} | {_ratio(other.end_to_end, batched.end_to_end)} |")
    peak_frac = (gflop / batched.steady) / peak if not batched.skipped else float("nan")
    big = [r for r in scaling if r["clients"] >= 1000]
    # Ceiling: the speed-up batched would show if it ran at 100% of the matmul peak.
    floor = gflop / peak
    # (label, measured, ceiling, goal, share of the peak batched ran at for that measurement)
    e2e_rate = work.rounds * gflop / batched.end_to_end / peak  # the whole run's arithmetic
    targets = [
        ("batched >= 5x faster per round than Flower (steady state)",
         flower.steady / batched.steady, flower.steady / floor, 5.0, peak_frac),
        ("batched >= 10x faster than Flower end to end (5 rounds incl. start-up)",
         flower.end_to_end / batched.end_to_end, flower.end_to_end / (work.rounds * floor), 10.0, e2e_rate),
        ("batched >= 3x faster per round than the plain per-client loop (DataLoader, the usual "
         "research-code way)", loader.steady / batched.steady, loader.steady / floor, 3.0, peak_frac),
        ("stricter: batched >= 3x faster per round than a tuned per-client loop (tensor indexing, "
         "no DataLoader, the faster product route)", tuned.steady / batched.steady, tuned.steady / floor,
         3.0, peak_frac),
        ("batched >= 40% of the measured matmul peak", peak_frac * 100, 100.0, 40.0, peak_frac),
    ]  # fmt: skip
    for r in big:  # ceiling: sequential's time over the round's arithmetic at the matmul peak
        targets.append(
            (f"scaling, {r['model']}, {r['clients']:,} clients: batched >= 20x faster than sequential",
             r["speedup"], r["sequential"] / (r["gflop"] / peak), 20.0, r["gflop"] / r["batched"] / peak)
        )  # fmt: skip
    by_name = {r["algorithm"]: r for r in personalised or []}
    for name, r in by_name.items():
        if name != "fedavg":
            targets.append(
                (f"personalised, {name}: batched >= 3x faster per round than sequential", r["speedup"],
                 float("nan"), 3.0, float("nan"))
            )  # fmt: skip
    if "ditto" in by_name and "fedavg" in by_name:
        ratio = by_name["ditto"]["batched"] / by_name["fedavg"]["batched"]
        # a "within 2.5x" target: measured as FedAvg's share of Ditto's time, so higher is better
        targets.append(
            ("personalised: Ditto's batched round within 2.5x of FedAvg's batched round (shown: "
             "2.5 / (Ditto / FedAvg), >= 1 when met)", 2.5 / ratio, float("nan"), 1.0, float("nan"))
        )  # fmt: skip
    lines += [
        "",
        "## Targets",
        "",
        "The ceiling is what batched would reach at 100% of the matmul peak measured above (rounds "
        "cannot take less than GFLOP per round / peak); a target above its ceiling cannot be met on "
        "this machine by any implementation of the same arithmetic. 'Needs' is the share of the "
        "peak batched would have to run at to meet a speed-up target, next to the share it ran at "
        "(where a target needs only a few percent, what limits it is per-client bookkeeping, not "
        "arithmetic).",
        "",
        "| target | measured | ceiling | needs | batched ran at | met |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    for label, value, ceiling, goal, rate in targets:
        unit = "%" if "peak" in label else "x"
        met = "—" if value != value else ("yes" if value >= goal else "**no**")
        # two decimals: a ratio of 19.96 must not read as a met "20.0x"
        shown = f"{_fmt(value, 1 if unit == '%' else 2)}{unit}" if value == value else "—"
        top = f"{_fmt(ceiling, 1)}{unit}" if ceiling == ceiling else "—"
        if unit == "%":
            needs = f"{goal:.0f}%"
        else:
            needs = f"{100 * goal / ceiling:.0f}%" if ceiling == ceiling and ceiling > 0 else "—"
        ran = f"{100 * rate:.0f}%" if rate == rate else "—"
        lines.append(f"| {label} | {shown} | {top} | {needs} | {ran} | {met} |")

    if sections:
        lines += conv.report_lines(sections, env["conv_peaks"], peak)
    if scaling:
        lines += [
            "",
            "## Scaling: seconds per round vs sampled clients (20-50 images each)",
            "",
            "FedAvg, every client sampled, 1 local epoch, batch 32. Each point is the fastest of "
            "9 timed rounds up to 1,000 clients and of 5 above (the least disturbed measurement on "
            "a shared machine). Batched and sequential take turns, two consecutive rounds each, so "
            "a drift in the machine's speed falls on both; only the second of each pair is timed, "
            "so neither is timed on caches the other just displaced. The last column divides each "
            "turn's sequential round by the batched round just before it: its spread is how far "
            "the machine's speed moved the ratio while the point was measured. "
            "Digits 8x8 with an MLP 64-32-10 is the regime where per-client overhead dominates; MNIST "
            "with the 784-200-10 MLP is arithmetic-bound (about "
            f"{35 * executed_flops_per_sample([784, HIDDEN, 10]) / 1e6:.0f} MFLOP per client per round "
            "here), so its speed-up is capped by the matmul peak (the ceiling in the targets table).",
            "",
            "![scaling](throughput_scaling.png)",
            "",
            "| model | clients | images/round | batched (s) | sequential (s) | batched speed-up "
            "| per turn: median (range) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in scaling:
            turns = r["turn_speedups"]
            lines.append(
                f"| {r['model']} | {r['clients']:,} | {r['samples']:,} | {r['batched']:.3f} | "
                f"{r['sequential']:.3f} | {r['speedup']:.1f}x | {statistics.median(turns):.1f}x "
                f"({turns[0]:.1f}-{turns[-1]:.1f}x) |"
            )
    if personalised:
        fedavg_batched = by_name.get("fedavg", {}).get("batched", float("nan"))
        lines += [
            "",
            "## Personalised algorithms: batched vs sequential, same workload",
            "",
            f"MNIST, {work.data.num_clients} IID clients, all sampled, MLP 784-{HIDDEN}-10, each algorithm "
            "with its default hyper-parameters (FedRep: 5 head epochs then 1 body epoch per round; "
            "Ditto: 1 epoch of the global and 1 of the personal model; APFL: the global model, the "
            "personal model and alpha from one objective per step). Fastest of the timed turns, "
            "batched and sequential taking turns as in the scaling curve. Plain-loss requests (every "
            "algorithm here but APFL) train on the hand-written chain step, APFL's mixture objective on "
            "its own (`training/fused.py`, `MixtureChainStep`).",
            "",
            "| algorithm | batched (s/round) | sequential (s/round) | batched speed-up | per turn: median "
            "(range) | batched / FedAvg batched |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in personalised:
            turns = r["turn_speedups"]
            lines.append(
                f"| {r['algorithm']} | {r['batched']:.3f} | {r['sequential']:.3f} | {r['speedup']:.1f}x | "
                f"{statistics.median(turns):.1f}x ({turns[0]:.1f}-{turns[-1]:.1f}x) | "
                f"{r['batched'] / fedavg_batched:.2f} |"
            )
    if memory:
        lines += [
            "",
            "## Memory: one batched round with 1000 sampled clients, MLP 784-200-10",
            "",
            "Measured in a fresh process per row (peak resident set size, VmHWM, which includes "
            "Python, torch, MNIST and the per-client replies). Target: peak < 4 GiB.",
            "",
            "| stacking | groups | clients' parameters (MiB) | RSS before round (MiB) | peak RSS (MiB) | "
            "round (s) | < 4 GiB |",
            "|---|---:|---:|---:|---:|---:|:---:|",
        ]
        for m in memory:
            if "error" in m:
                lines.append(f"| failed: {m['error']} | | | | | | |")
                continue
            label = (
                f"default ({m['budget_gib']:.0f} GiB budget, per-step caps)"
                if m.get("default")
                else "all 1000 clients in one stack"
            )
            ok = "yes" if m["peak_mib"] < 4096 else "**no**"
            lines.append(
                f"| {label} | {m['groups']} | {m['params_mib']:.0f} | {m['rss_before_mib']:.0f} | "
                f"{m['peak_mib']:.0f} | {m['seconds']:.2f} | {ok} |"
            )
    lines += [
        "",
        "## How it was measured",
        "",
        "- All runners share one process's data arrays (Flower's ClientApps load the same arrays from an "
        ".npz written once); reading and partitioning MNIST is not timed for anyone.",
        "- fedmtl: `Simulator.run_round` timed per round (sampling, systems draws, local training, "
        "FedAvg aggregation); end to end adds building model, algorithm and simulator and the final "
        "evaluation.",
        "- Plain PyTorch loops: `nn.Module` + a fresh `torch.optim.SGD` per client, clients one after "
        "another, weighted average of state dicts (`benchmarks/flower_throughput_app/task.py`). "
        "'DataLoader' draws each mini-batch from a `DataLoader` over a `TensorDataset` (as PFLlib's "
        "and FL-bench's clients do), with a batch sampler that yields the same batches as the "
        "others; 'tensor indexing' indexes the client's tensors directly (`x[idx]`), the fastest "
        "way to write the same loop, and what Flower's ClientApp runs.",
        "- Flower: `flwr.simulation.run_simulation` with the ClientApp/ServerApp imported from "
        "`benchmarks/flower_throughput_app` (the same `task.train`), Ray backend, "
        "`client_resources={num_cpus: 1}`, FedAvg with `fraction_evaluate=0` and a central "
        "`evaluate_fn` that timestamps every round; end to end is the whole `run_simulation` call "
        "(Ray and actor start-up included).",
        "- GFLOP/s divides the FLOPs executed per round (above) by the steady round time; the usual "
        "3x-the-forward-pass convention would inflate every rate by "
        f"{work.conventional_flops_per_sample / work.flops_per_sample:.2f}x.",
        f"- Each runner ran {args.passes} time(s), the passes in alternating order (the second pass "
        "reversed), so a slow spell on the shared machine does not fall on one runner only; steady "
        "is the fastest round after the first over all passes, median the median of those rounds, "
        "round 1 and end to end the mean over the passes.",
    ]
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------ main


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fedmtl bench throughput", description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke mode: 10 clients, 2 rounds, small scaling, no Flower"
    )
    p.add_argument("--out", default=str(HERE / "results"), help="directory for throughput.md and the PNG")
    p.add_argument("--clients", type=int, help="clients in the side-by-side workload (default 100)")
    p.add_argument("--rounds", type=int, help="rounds in the side-by-side workload (default 5)")
    p.add_argument("--flower", action=argparse.BooleanOptionalAction, default=None, help="run the Flower row")
    p.add_argument("--scaling", help="comma-separated client counts (default 10,100,1000,10000)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads for the in-process runners (default: one per core, as Flower's actors use "
        "every core; OMP_NUM_THREADS, which make sets to 1 for tests, does not apply)",
    )
    p.add_argument(
        "--passes", type=int, help="runs of every runner, alternating order (default 2; 1 with --quick)"
    )
    p.add_argument(
        "--conv",
        action=argparse.BooleanOptionalAction,
        help="run the convolutional and recurrent section (LEAF's FEMNIST CNN and Shakespeare LSTM; "
        "default: on, off with --quick)",
    )
    p.add_argument(
        "--conv-clients", help="comma-separated clients per round of the CNN workload (default 20,100)"
    )
    p.add_argument("--conv-rounds", type=int, help="rounds of the CNN and LSTM workloads (default 3)")
    p.add_argument("--text-clients", type=int, help="clients of the LSTM workload (default 20)")
    p.add_argument(
        "--conv-turns",
        type=int,
        help="paired turns of batched and sequential rounds per CNN workload (default 3; 1 with --quick)",
    )
    p.add_argument(
        "--only-conv",
        action="store_true",
        help="run only the convolutional and recurrent section and write it into the existing "
        "throughput.md in place of the previous one (the MLP sections keep their own measurement)",
    )
    p.add_argument("--memory-probe", type=int, help=argparse.SUPPRESS)
    p.add_argument("--budget-gib", type=float, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def merge_passes(runs: list[RunnerResult]) -> RunnerResult:
    """One row from several passes of a runner: all steady-state rounds pooled (steady is their
    best, median their median); round 1 and end to end are means over the passes (start-up costs
    differ between a process's first and later runs, for every runner alike); accuracy is the same
    in every pass (same seed)."""
    done = [r for r in runs if not r.skipped]
    if not done:
        return runs[0]
    later = [t for r in done for t in r.rounds[1:]]
    first = done[0]
    merged = RunnerResult(
        first.name, rounds=[float(np.mean([r.rounds[0] for r in done])), *later],
        end_to_end=float(np.mean([r.end_to_end for r in done])), accuracy=first.accuracy,
        clients=first.clients, note=first.note, load=float(np.mean([r.load for r in done])),
    )  # fmt: skip
    if len({round(r.accuracy, 6) for r in done}) > 1:
        merged.note = (merged.note + "; " if merged.note else "") + "accuracy differed between passes"
    return merged


def _timed(label: str, fn: Callable[[], RunnerResult]) -> RunnerResult:
    print(f"running {label} ...", flush=True)
    load = os.getloadavg()[0]
    res = fn()
    res.load = load
    if not res.skipped:
        rounds = ", ".join(f"{t:.2f}" for t in res.rounds)
        print(f"  {res.name}: rounds {rounds} s; {res.end_to_end:.2f} s end to end, "
              f"accuracy {res.accuracy:.4f}", flush=True)  # fmt: skip
    elif res.note:
        print(f"  {res.note}", flush=True)
    return res


def main(argv: list[str]) -> Path:
    args = _parse(argv)
    args.argv = list(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.budget_gib)))
        return Path(args.out)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> Path:
    quick = args.quick
    args.passes = args.passes or (1 if quick else 2)
    clients = args.clients or (10 if quick else 100)
    rounds = args.rounds or (2 if quick else 5)
    run_flower_row = args.flower if args.flower is not None else not quick
    sizes = (
        [int(s) for s in args.scaling.split(",")]
        if args.scaling
        else ([10, 30] if quick else [10, 100, 1000, 10000])
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.only_conv:
        return _run_conv_only(args, out, run_flower_row)

    env: dict[str, Any] = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_start": os.getloadavg()[0],
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False, cwd=HERE
        ).stdout.strip()
        or "unknown",
        "omp": os.environ.get("OMP_WAIT_POLICY", "unset"),
    }
    try:
        import flwr

        env["flwr"] = f"flwr {flwr.__version__}"
    except ImportError:
        env["flwr"] = "flwr not installed"
    env["peak_n"] = 1024 if quick else 2048
    env["peaks"] = matmul_peaks(env["peak_n"])
    peak_probe = set(onednn.verdicts())
    peak = env["peaks"]["peak"]
    print(
        f"matmul peak: {peak:.1f} GFLOP/s (default {env['peaks']['default']:.1f}, "
        f"oneDNN {env['peaks']['onednn']:.1f})",
        flush=True,
    )

    # --quick keeps 10 of 100 IID clients (594 images each) so the smoke run stays short.
    data_cfg = DataConfig(
        dataset="mnist",
        test_fraction=TEST_FRACTION,
        partition=PartitionConfig(kind="iid", num_clients=100 if quick else clients),
        max_clients=clients if quick else None,
    )
    data = load_federated(data_cfg, SEED)
    model = build_model(
        parse_config(fedmtl_config("sequential", [HIDDEN], rounds)).model, data.input_shape, 10, SEED
    )
    work = Workload(
        data,
        rounds,
        executed_flops_per_sample([784, HIDDEN, 10]),
        model_arrays(model),
        fedmtl_run.train_flops_per_sample(model, data.input_shape),
    )
    runners: dict[str, Callable[[], RunnerResult]] = {
        "batched": lambda: run_fedmtl(work, "batched"),
        "sequential": lambda: run_fedmtl(work, "sequential"),
        "plain": lambda: run_plain(work),
        "loader": lambda: run_plain(work, loader=True),
    }
    if onednn.available():
        runners["plain_dnn"] = lambda: run_plain(work, dnn=True)
    labels = {
        "batched": "fedmtl batched",
        "sequential": "fedmtl sequential",
        "plain": "plain PyTorch loop (tensor indexing)",
        "loader": "plain PyTorch loop (DataLoader)",
        "plain_dnn": "plain PyTorch loop (tensor indexing, oneDNN products)",
    }
    with tempfile.TemporaryDirectory() as tmp:
        if run_flower_row:
            runners["flower"] = lambda: run_flower(work, Path(tmp))
            labels["flower"] = "Flower"
        passes: dict[str, list[RunnerResult]] = {k: [] for k in runners}
        for p in range(args.passes):
            for key in runners if p % 2 == 0 else reversed(list(runners)):
                passes[key].append(_timed(f"{labels[key]} (pass {p + 1})", runners[key]))
    results = {key: merge_passes(runs) for key, runs in passes.items()}
    # the training runs' product shapes (not the peak's own 2048x2048 probe)
    probed = {k: v for k, v in onednn.verdicts().items() if k not in peak_probe}
    env["route"] = (sum(probed.values()), len(probed))
    if not run_flower_row:
        results["flower"] = RunnerResult("Flower run_simulation", note="skipped (--quick or --no-flower)")
    # The peak again, after the runners: a neighbour's burst on the shared machine during one
    # measurement would understate it (and overstate every "% of peak"); the better one counts.
    env["peaks"] = best_peaks(env["peaks"], matmul_peaks(env["peak_n"]))
    peak = env["peaks"]["peak"]
    print(f"matmul peak, best of before and after the runners: {peak:.1f} GFLOP/s", flush=True)

    sections: list[dict[str, Any]] = []
    if args.conv if args.conv is not None else not quick:
        print("convolutional and recurrent workloads ...", flush=True)
        sections, env["conv_peaks"] = conv_section(args, run_flower_row)

    print("scaling curve ...", flush=True)
    digits = load_federated(
        DataConfig(dataset="digits", test_fraction=TEST_FRACTION, partition=PartitionConfig(kind="iid")), SEED
    )
    scaling = scaling_curve(
        [
            # Overhead-bound: small inputs and model, per-client compute is tiny.
            ScalingWorkload("digits 8x8, MLP 64-32-10", digits, [32], max(sizes)),
            # Compute-bound: the side-by-side model; 10,000 clients would need 6 GB of replies alone.
            ScalingWorkload(f"MNIST, MLP 784-{HIDDEN}-10", data, [HIDDEN], 1000),
        ],
        sizes,
    )
    if scaling:
        plot_scaling(scaling, out / "throughput_scaling.png")

    print("personalised algorithms ...", flush=True)
    personalised = personalised_turns(data, 1 if quick else 3)

    memory: list[dict[str, Any]] = []
    if not quick:
        print("memory probes ...", flush=True)
        default = run_memory_probe(1000, None)
        default["default"] = True
        memory = [default, run_memory_probe(1000, 16.0)]
    env["load_end"] = os.getloadavg()[0]
    path = out / "throughput.md"
    write_report(path, args, work, peak, results, scaling, memory, env, personalised, sections)
    return path


#: the conv section's runners, in the order they run
CONV_RUNNERS = {
    "batched": "fedmtl batched",
    "sequential": "fedmtl sequential",
    "plain": "plain PyTorch loop (tensor indexing)",
    "flower": "Flower run_simulation",
}


def conv_workloads(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """The CNN workload at each client count, then the LSTM one (``_throughput_conv``)."""
    quick = args.quick
    rounds = args.conv_rounds or (2 if quick else 3)
    counts = (
        [int(c) for c in args.conv_clients.split(",")] if args.conv_clients else ([3] if quick else [20, 100])
    )
    out = []
    for n in counts:
        data = conv.writers(n)
        cfg = conv.fedmtl_config({"name": "cnn", "preset": "femnist"}, {"dataset": "mnist"}, conv.CONV_LR)
        model = build_model(
            parse_config(cfg("sequential", rounds)).model, data.input_shape, data.task.num_outputs, SEED
        )
        work = Workload(
            data, rounds, conv.femnist_flops_per_sample(data.task.num_outputs), model_arrays(model),
            config=cfg, net={"kind": "femnist_cnn", "out": data.task.num_outputs}, batch=conv.BATCH,
            lr=conv.CONV_LR,
        )  # fmt: skip
        out.append({"label": f"LEAF FEMNIST CNN, {n} clients", "kind": "cnn", "work": work})
    roles = args.text_clients or (2 if quick else 20)
    text = conv.text_data(conv.text_roles(tmp / "text", roles))
    vocab = len(text.vocab or []) + 1  # the characters and the padding id
    cfg = conv.fedmtl_config({"name": "rnn"}, {"dataset": "leaf", "file": str(tmp / "text")}, conv.TEXT_LR)
    model = build_model(
        parse_config(cfg("sequential", rounds)).model, text.input_shape, text.task.num_outputs, SEED, vocab
    )
    work = Workload(
        text, rounds, conv.lstm_flops_per_sample(conv.SEQ, vocab, text.task.num_outputs), model_arrays(model),
        config=cfg, net={"kind": "char_lstm", "vocab": vocab, "out": text.task.num_outputs}, batch=conv.BATCH,
        lr=conv.TEXT_LR,
    )  # fmt: skip
    out.append({"label": f"LEAF Shakespeare LSTM, {roles} clients", "kind": "lstm", "work": work})
    return out


def conv_section(
    args: argparse.Namespace,
    flower: bool,
    done: Callable[[list[dict[str, Any]], dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every runner on every convolutional and recurrent workload, one pass each, with the
    convolution peak measured before and after; ``done`` gets the sections finished so far after
    each workload (so that a long run leaves its finished tables behind)."""
    peaks = conv.conv_peak()
    print(f"  convolution peak: {peaks['peak']:.1f} GFLOP/s ({peaks['shape']})", flush=True)
    sections = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for i, section in enumerate(conv_workloads(args, tmp)):
            work = section["work"]
            # the LSTM cannot be stacked (docs/batched.md): "auto" trains it as sequential does
            execution = "auto" if section["kind"] == "lstm" else "batched"
            runners: dict[str, Callable[[], RunnerResult]] = {
                "batched": lambda w=work, e=execution: run_fedmtl(w, e),
                "sequential": lambda w=work: run_fedmtl(w, "sequential"),
                "plain": lambda w=work: run_plain(w),
            }
            if flower:
                folder = tmp / f"flower{i}"
                folder.mkdir()
                runners["flower"] = lambda w=work, f=folder: run_flower(w, f)
            results = {
                key: _timed(f"{section['label']}: {CONV_RUNNERS[key]}", fn) for key, fn in runners.items()
            }
            if not flower:
                results["flower"] = RunnerResult(
                    "Flower run_simulation", note="skipped (--quick or --no-flower)"
                )
            if section["kind"] == "lstm":
                results["batched"].name = "fedmtl batched (auto: the LSTM trains sequentially)"
            turns = args.conv_turns if args.conv_turns is not None else (1 if args.quick else 3)
            if section["kind"] == "cnn" and turns > 0:
                print(f"running {section['label']}: {turns} paired turns ...", flush=True)
                section["turns"] = paired_turns(work, ["batched", "sequential"], turns)
                print(f"  {section['turns']}", flush=True)
            sections.append({**section, "results": results})
            if done is not None:
                done(sections, peaks)
    peaks = conv.best_conv_peaks(peaks, conv.conv_peak())
    return sections, peaks


def paired_turns(work: Workload, executions: list[str], repeats: int) -> dict[str, list[float]]:
    """``timed_turns`` for a workload with its own config (the conv section's): the executions
    alternate two rounds at a time, the second of each pair timed, so that a neighbour's load on
    the shared machine falls on both rather than on whichever runner ran during it."""
    assert work.config is not None
    runs = []
    for execution in executions:
        with given_data(work.data):
            _, algo, sim = fedmtl_run.build(parse_config(work.config(execution, 2 * repeats)))
        runs.append([sim, algo.init_server(), {}])
    return _paired_turns(runs, executions, repeats)


def _run_conv_only(args: argparse.Namespace, out: Path, flower: bool) -> Path:
    """The convolutional and recurrent section alone, with both peaks measured before and after
    it, written into ``out/throughput.md`` under its own provenance line."""
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    n = 1024 if args.quick else 2048
    peaks = matmul_peaks(n)
    print(f"matmul peak: {peaks['peak']:.1f} GFLOP/s", flush=True)
    print("convolutional and recurrent workloads ...", flush=True)
    path = out / "throughput.md"

    def write(sections: list[dict[str, Any]], conv_peaks: dict[str, Any], final: bool = False) -> None:
        _write_conv_only(path, args, started, load_start, n, peaks, sections, conv_peaks, final)

    sections, conv_peaks = conv_section(args, flower, write)
    peaks = best_peaks(peaks, matmul_peaks(n))
    write(sections, conv_peaks, final=True)
    print(f"wrote the convolutional section of {path}", flush=True)
    return path


def _write_conv_only(
    path: Path,
    args: argparse.Namespace,
    started: float,
    load_start: float,
    n: int,
    peaks: dict[str, Any],
    sections: list[dict[str, Any]],
    conv_peaks: dict[str, Any],
    final: bool,
) -> None:
    lines = conv.report_lines(sections, conv_peaks, peaks["peak"])
    try:
        import flwr

        flwr_version = f"flwr {flwr.__version__}"
    except ImportError:
        flwr_version = "flwr not installed"
    peak_when = "best of before and after the runners" if final else "before the runners"
    about = [
        provenance.line("throughput", args.argv, started),
        "",
        f"- Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {flwr_version}. Load average (1 min) at start / end: "
        f"{load_start:.2f} / {os.getloadavg()[0]:.2f} (other processes on the shared machine slow every "
        "runner; compare ratios within this section, not seconds with the MLP sections, which were "
        "measured in another run).",
        f"- Matmul peak measured in this run: {peaks['peak']:.1f} GFLOP/s (float32 {n}x{n}, {peak_when}, "
        "the faster exact route).",
    ]
    if not final:
        about.append("- **Incomplete**: written after the workloads below; the run did not finish the rest.")
    lines[3:3] = [*about, ""]
    conv.splice_section(path, lines)


if __name__ == "__main__":
    main(sys.argv[1:])


def _paired_turns(runs: list[list[Any]], executions: Sequence[str], repeats: int) -> dict[str, list[float]]:
    """Executions take turns of two rounds each (the second timed), so a neighbour's load falls on all."""
    times: dict[str, list[float]] = {e: [] for e in executions}
    for pair in range(repeats):
        for execution, run in zip(executions, runs, strict=True):
            for r in (2 * pair + 1, 2 * pair + 2):
                sim, server, states = run
                t = time.perf_counter()
                run[1] = sim.run_round(r, server, states).server
                if r % 2 == 0:
                    times[execution].append(time.perf_counter() - t)
    return times
