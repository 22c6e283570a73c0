"""One typed config schema for the CLI, the Python API and the Flower apps.

Every error names the key, the bad value and what is allowed, in one line. Algorithm- and
model-specific hyper-parameters live next to their implementation (``Params`` classes found by
name) and are validated here through the registries, so unknown keys are errors everywhere.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedmtl.aggregation.config import AggregationSteps
from fedmtl.config_base import Strict
from fedmtl.data.config import DataConfig
from fedmtl.data.config import PartitionConfig as PartitionConfig  # re-exported: the schema in one place
from fedmtl.errors import ConfigError
from fedmtl.features.attack import AttackConfig
from fedmtl.features.privacy import PrivacyConfig
from fedmtl.features.secagg import SecAggConfig
from fedmtl.features.selection import SelectionConfig


class ModelConfig(Strict):
    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = "mlp"


class AlgorithmConfig(Strict):
    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = "fedavg"


class TrainConfig(Strict):
    rounds: int = Field(20, ge=1)
    local_epochs: float = Field(1.0, gt=0)
    local_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "exponential", "cosine"] = "constant"
    lr_decay: float = Field(0.99, gt=0, le=1)


class ClientsConfig(Strict):
    #: clients per round (fixed sampling), or expected clients per round (Poisson sampling)
    per_round: int | None = Field(None, ge=1)
    fraction: float = Field(1.0, gt=0, le=1)
    #: fixed: exactly ``per_round`` (or ``fraction`` of the training clients) drawn without
    #: replacement; poisson: every client independently with probability q = that number / the
    #: training clients, rounds of varying size. Default (null): poisson under client-level DP with
    #: server-side noise (the sampling its accountant models), fixed otherwise (distributed noise
    #: needs a known number of clients); the run's config records the choice.
    sampling: Literal["fixed", "poisson"] | None = None


class RuntimeConfig(Strict):
    execution: Literal["sequential", "batched", "auto"] = "sequential"
    #: where local training and evaluation compute: cpu, cuda (cuda:N), or auto (CUDA if present)
    device: str = Field("cpu", pattern=r"^(cpu|auto|cuda(:[0-9]+)?)$")
    batch_memory_gib: float = Field(2.0, gt=0, description="budget for stacking sampled clients when batched")
    onednn: bool = Field(
        True, description="batched MLP steps multiply on oneDNN's float32 kernels where probed exact"
    )
    work_fraction: tuple[float, float] = (1.0, 1.0)
    drop_prob: float = Field(0.0, ge=0, lt=1)
    always_drop: list[int] = Field(default_factory=list, description="clients that drop every round")
    client_gflops: float = Field(1.0, gt=0)
    uplink_mbps: float = Field(10.0, gt=0)
    downlink_mbps: float = Field(50.0, gt=0)
    state_cache_mib: float = Field(
        1024.0, gt=0, description="client states kept in memory; the rest wait on disk in the run directory"
    )

    @field_validator("work_fraction")
    @classmethod
    def _fraction_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0 < lo <= hi <= 1):
            raise ValueError("must be [low, high] with 0 < low <= high <= 1")
        return v


class EvalConfig(Strict):
    every: int = Field(1, ge=1)
    #: clients evaluated per evaluation round: None = every training client; a fraction in (0, 1)
    #: or a count draws that many anew each evaluation (seeded), and rows carry the 95% interval
    clients: int | float | None = Field(None, gt=0)
    global_test: bool = True
    new_client_steps: int = Field(10, ge=0)
    new_client_lr: float | None = Field(None, gt=0)


class OutputConfig(Strict):
    dir: str = "runs"
    checkpoint_every: int = Field(1, ge=1)
    #: a bar on a terminal, else one line per evaluated round on stderr (the ``fedmtl`` logger)
    progress: bool = True
    #: round rows as TensorBoard scalars in ``<run>/tensorboard`` (the ``tensorboard`` extra)
    tensorboard: bool = False
    #: client states left once the run is complete: all (as checkpointed), final (each client's
    #: last state only) or none
    client_states: Literal["all", "final", "none"] = "all"


class Config(Strict):
    name: str = "run"
    seed: int = Field(0, ge=0)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    train: TrainConfig = TrainConfig()
    clients: ClientsConfig = ClientsConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()
    selection: SelectionConfig = SelectionConfig()
    aggregation: AggregationSteps = Field(default_factory=list)
    attack: AttackConfig = AttackConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    secagg: SecAggConfig = SecAggConfig()

    @model_validator(mode="after")
    def _resolve_registered(self) -> Config:
        # Imported here: the registries import models/algorithms, which import this module.
        from fedmtl.algorithms import algorithm_params
        from fedmtl.models import model_params

        self.__dict__["algorithm"] = _validate_section("algorithm", self.algorithm, algorithm_params)
        self.__dict__["model"] = _validate_section("model", self.model, model_params)
        return self

    @model_validator(mode="after")
    def _sampling_matches_the_accountant(self) -> Config:
        """Client sampling and what the privacy accountant assumes about it are one decision: the
        default follows client-level DP, and a pairing that would report the wrong epsilon is refused."""
        from fedmtl.algorithms import get_algorithm
        from fedmtl.features.privacy import resolve_sampling

        algo = get_algorithm(self.algorithm.name)
        mean_only = algo.reduces == "mean" and algo.mean_of_updates
        self.clients.__dict__["sampling"], privacy = resolve_sampling(
            self.clients.sampling, self.privacy, mean_only
        )
        self.__dict__["privacy"] = privacy
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _validate_section(section: str, value: BaseModel, params_for: Any) -> BaseModel:
    raw = value.model_dump()
    name = raw.pop("name")
    params_cls = params_for(name)  # raises ConfigError naming the allowed names
    try:
        params = params_cls.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, prefix=section, model=params_cls)) from None
    cls = AlgorithmConfig if section == "algorithm" else ModelConfig
    return cls(name=name, **params.model_dump())


def _allowed_keys(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    cur: Any = model
    for part in loc[:-1]:
        if cur is None or not isinstance(part, str) or part not in cur.model_fields:
            return []
        ann = cur.model_fields[part].annotation
        # an optional section (``X | None``) lists X's keys
        models = [a for a in (*get_args(ann), ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        cur = models[0] if models else None
    return sorted(cur.model_fields) if cur is not None else []


def _format_validation_error(
    exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None
) -> str:
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc)
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, loc)
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"config: unknown key '{key}'{hint}"
    msg = err["msg"]
    msg = msg.removeprefix("Value error, ")
    msg = msg[0].lower() + msg[1:] if msg else msg
    return f"config: {key} = {err.get('input')!r}: {msg}"


def parse_config(raw: dict[str, Any] | None) -> Config:
    """Validate a plain dict (from YAML, the API or Flower's run config) into a Config."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, model=Config)) from None


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw config dict."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set: bad key {key!r}; use dotted keys such as train.lr=0.1")
        cur = out
        for part in parts[:-1]:
            nxt = cur.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set: '{part}' in {key!r} is not a section")
            cur = nxt
        cur[parts[-1]] = _parse_scalar(value)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {p}: invalid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    raw = load_yaml(path) if path is not None else {}
    return parse_config(apply_overrides(raw, overrides or []))
