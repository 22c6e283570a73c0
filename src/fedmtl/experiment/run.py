"""The round loop: build data, model and algorithm from a Config, run rounds, record everything.

A run is a pure function of its config (seed included): resuming from a checkpoint continues the
same computation, so a killed and resumed run ends with the metrics of an uninterrupted one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedmtl.algorithms import AlgoContext, Algorithm, get_algorithm
from fedmtl.config import Config, parse_config
from fedmtl.data import load_federated
from fedmtl.data.federated import FederatedData
from fedmtl.errors import ConfigError
from fedmtl.experiment import outputs
from fedmtl.experiment.identity import check_resume, run_identity
from fedmtl.experiment.progress import Watch, log
from fedmtl.experiment.records import RunDir
from fedmtl.features import apply_features
from fedmtl.metrics import primary_metric
from fedmtl.models import build_model
from fedmtl.runtime import Simulator
from fedmtl.runtime.client_states import open_states
from fedmtl.runtime.loop import Progress, RunLoop
from fedmtl.training import LocalSpec, device
from fedmtl.training.optim import OptimizerSpec
from fedmtl.training.tensors import model_arrays


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    clients: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, Any]:
        return self.summary["final"]


def local_spec(cfg: Config) -> LocalSpec:
    t = cfg.train
    opt = OptimizerSpec(name=t.optimizer, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return LocalSpec(optimizer=opt, batch_size=t.batch_size, epochs=t.local_epochs, steps=t.local_steps)


def train_flops_per_sample(model: torch.nn.Module, input_shape: tuple[int, ...]) -> float:
    """Forward multiply-add FLOPs of dense and conv layers for one sample, times 3 for the backward.

    Counted with hooks rather than torch's FlopCounterMode, whose import costs seconds per process."""
    total = [0.0]

    def hook(mod: torch.nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if isinstance(mod, torch.nn.Linear):
            total[0] += 2.0 * mod.in_features * mod.out_features
        elif isinstance(mod, torch.nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total[0] += 2.0 * k * out[0].numel()
        elif isinstance(mod, torch.nn.RNNBase):  # gates x (input + hidden) x hidden per step and layer
            gates = {"LSTM": 4, "GRU": 3}.get(mod.mode, 1)
            steps = inp[0].shape[1] if mod.batch_first else inp[0].shape[0]
            width = mod.input_size + mod.hidden_size
            layers = width + (mod.num_layers - 1) * 2 * mod.hidden_size
            total[0] += 2.0 * gates * layers * mod.hidden_size * steps

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d | torch.nn.RNNBase)
    ]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    finally:
        for h in handles:
            h.remove()
    return 3.0 * total[0]


def build(cfg: Config) -> tuple[FederatedData, Algorithm, Simulator]:
    """The data, the algorithm (inside its features) and the in-process simulator of a config."""
    data, algo, flops = build_algorithm(cfg)
    if data.info.get("described"):
        raise ConfigError(
            "config: data.dataset = 'federation': its samples are on the Flower nodes, not here; run it "
            "on Flower (flwr run, fedmtl flower run --node-data DIR)"
        )
    return data, algo, Simulator(algo, data, cfg, flops)


def build_algorithm(cfg: Config, data: FederatedData | None = None) -> tuple[FederatedData, Algorithm, float]:
    """The data, the algorithm inside its features, and training FLOPs per sample (what every
    runtime needs; a Flower node and the ServerApp build this much, not a simulator). ``data``: a
    federation built elsewhere (a node's, from the server's description and its own files)."""
    data = load_federated(cfg.data, cfg.seed) if data is None else data
    vocab = len(data.vocab) + 1 if data.vocab is not None else None  # + the padding id
    # One model per task: the same seed gives every task the same body, heads sized per task.
    models = {
        name: build_model(cfg.model, data.input_shape, t.num_outputs, cfg.seed, vocab)
        for name, t in data.tasks.items()
    }
    model = models[data.task.name]
    ctx = AlgoContext(
        model=model,
        init_arrays=model_arrays(model),
        task=data.task,
        local=local_spec(cfg),
        seed=cfg.seed,
        num_clients=data.num_clients,
        models=models,
        task_init={name: model_arrays(m) for name, m in models.items()},
        client_tasks=dict(enumerate(data.task_names())),
        task_specs=data.tasks,
    )
    algo_cls = get_algorithm(cfg.algorithm.name)
    if cfg.aggregation and algo_cls.reduces != "mean":
        why = algo_cls.reduces_why or f"its server combines replies as {algo_cls.reduces!r}"
        raise ConfigError(
            f"config: aggregation: algorithm {algo_cls.name!r} cannot use an aggregation chain "
            f"({why}); remove the aggregation list"
        )
    raw = cfg.algorithm.model_dump()
    raw.pop("name")
    algo = apply_features(algo_cls(algo_cls.Params.model_validate(raw), ctx), cfg, data)
    return data, algo, train_flops_per_sample(model, data.input_shape)


def as_ran(cfg: Config, data: FederatedData) -> Config:
    """The config with what the data resolved written in (``data.normalize: auto`` -> what it did),
    so the run directory's config.yaml says how the samples were scaled."""
    norm = data.info.get("normalize")
    if norm is None or norm == cfg.data.normalize:
        return cfg
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"normalize": norm})})


def _as_config(config: Config | dict[str, Any] | str | Path) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, str | Path):
        from fedmtl.config import load_config

        return load_config(config)
    return parse_config(config)


def runs_a_round(algo: Algorithm) -> None:
    """Refuse (one line, before any folder exists) a config whose run would stop before round 1,
    e.g. a privacy budget below what the first round spends."""
    why = algo.stop_reason(algo.init_server(), 1)
    if why is not None:
        raise ConfigError(f"config: the run would stop before round 1: {why}")


def run(config: Config | dict[str, Any] | str | Path, out: str | Path | None = None) -> RunResult:
    """Run a config end to end in a new run directory (``out`` or ``output.dir/<name>-<time>``)."""
    cfg = _as_config(config)
    outputs.check(cfg)
    data, algo, sim = build(cfg)  # fail on bad data before creating any directory
    runs_a_round(algo)
    cfg = as_ran(cfg, data)
    rd = RunDir.create(cfg.output.dir, folder_name(cfg), cfg.seed, out)
    try:
        rd.identity = run_identity(cfg, data, algo)
        rd.write_config(cfg.to_dict())
        return _loop(cfg, rd, data, algo, sim, checkpoint=None)
    finally:
        rd.release()


def folder_name(cfg: Config) -> str:
    """An auto-named run folder says which algorithm ran (``fedmtl-digits-ditto-<time>-s0``)."""
    algo = cfg.algorithm.name
    return cfg.name if algo in cfg.name.split("-") else f"{cfg.name}-{algo}"


def resume(run_dir: str | Path, accept_mismatch: bool = False) -> RunResult:
    """Continue a run from its last checkpoint; a finished run is returned as it is. A folder whose
    config, data or model no longer match its checkpoint is refused unless ``accept_mismatch``
    (recorded in the folder)."""
    rd = RunDir.open(run_dir, lock=True)
    try:
        cfg = parse_config(rd.read_config())
        summary = rd.read_summary()
        if summary is not None and summary.get("complete"):
            return _result(rd, summary)
        ckpt = rd.load_checkpoint()
        data, algo, sim = build(cfg)
        rd.identity = run_identity(cfg, data, algo)
        accepted = check_resume(str(rd.path), ckpt and ckpt.get("identity"), rd.identity, accept_mismatch)
        if accepted:
            rd.record_resume(accepted)
        rd.truncate_metrics(ckpt["round"] if ckpt else 0)
        return _loop(cfg, rd, data, algo, sim, checkpoint=ckpt)
    finally:
        rd.release()


def _result(rd: RunDir, summary: dict[str, Any]) -> RunResult:
    rows = rd.read_metrics()
    last = summary["final"].get("round")
    return RunResult(
        run_dir=rd.path,
        summary=summary,
        rounds=[r for r in rows if r.get("kind") == "round"],
        clients=[r for r in rows if r.get("kind") == "client" and r.get("round") == last],
    )


def _loop(
    cfg: Config,
    rd: RunDir,
    data: FederatedData,
    algo: Algorithm,
    sim: Simulator,
    checkpoint: dict[str, Any] | None,
) -> RunResult:
    cache = int(cfg.runtime.state_cache_mib * 2**20)
    states = open_states(rd.path / "clients", cache, None if checkpoint is None else checkpoint["clients"])
    if checkpoint is None:
        progress = Progress(server=algo.init_server())
    else:
        progress = Progress(
            server=checkpoint["server"],
            start=checkpoint["round"] + 1,
            elapsed=checkpoint["elapsed"],
            best=checkpoint["best"],
            last=checkpoint.get("last"),
        )
    sim.transport.states = states
    metric, _ = primary_metric(data.task)
    verb = "continuing" if checkpoint is not None else "run folder"
    log.info(f"{verb} {rd.path}" + (f" after round {progress.start - 1}" if checkpoint else ""))
    watch = Watch(cfg.name, metric, progress.start, cfg.train.rounds, progress.elapsed, cfg.output.progress)
    board = outputs.board(cfg, rd.path, progress.start)

    def on_row(row: dict[str, Any]) -> None:
        watch.row(row)
        if board is not None:
            board.row(row)

    def say(text: str) -> None:
        log.warning(f"{cfg.name}: {text}")

    loop = RunLoop(
        cfg, algo, data, lambda r, server: sim.run_round(r, server, states), sim.transport, rd, say, on_row
    )
    try:
        with device.using(sim.device):  # evaluations too, not only the rounds
            summary = loop.run(progress)
    finally:
        watch.close()
        if board is not None:
            board.close()
    outputs.finish(rd, cfg, states)
    return _result(rd, summary)
