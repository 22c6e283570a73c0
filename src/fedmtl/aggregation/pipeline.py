"""The server's aggregation chain: optax-style transforms over client updates.

An *update* is what a client changed: its returned arrays minus the arrays the server sent it
(server key names, so in a multi-task federation a head ``<task>:head.*`` appears only in the
updates of that task's clients). A chain of steps turns the round's updates into one aggregate
update, which the server adds to its parameters:

    update steps (clip) -> one reduce step (mean, median, ...) -> aggregate steps (noise, retention)

Each step is an object with ``init() -> state`` and ``apply(batch, state) -> state``; it reads and
changes the ``Batch`` in place. Step state (an adaptive clip bound, the previous aggregate) lives in
the server state under ``"agg"``, so it is checkpointed and a resumed run continues it. Randomness
comes from ``batch.rng``, derived from (seed, round), so a seed reproduces every draw."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fedmtl.errors import ProtocolError
from fedmtl.training.tensors import Arrays

AGG_RNG = 11  # rng purpose, distinct from the runtime's and the algorithms'


@dataclass
class Batch:
    """One round's updates on their way through the chain.

    ``updates[i]`` is client ``cids[i]``'s update (float64, only the keys it carries);
    ``aggregate`` is None until the reduce step has run. ``sensitivity[k]`` is the largest share
    of the aggregate of key ``k`` one client controls (set by ``mean``), which noise calibration
    multiplies by ``clip_norm``."""

    cids: list[int]
    updates: list[dict[str, np.ndarray]]
    weights: np.ndarray
    reference: Arrays
    rng: np.random.Generator
    scalars: list[Mapping[str, Any]] = field(default_factory=list)
    aggregate: dict[str, np.ndarray] | None = None
    clip_norm: float | None = None
    sensitivity: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def keys(self) -> list[str]:
        """Every key some update carries, in reference order."""
        present = set().union(*(u.keys() for u in self.updates)) if self.updates else set()
        return [k for k in self.reference if k in present]

    def groups(self) -> list[tuple[list[str], list[int]]]:
        """Keys grouped by the clients that carry them: (keys, client indices). Single-task: one group;
        multi-task: the body (everyone) and one group per task head."""
        by: dict[tuple[int, ...], list[str]] = {}
        for k in self.keys():
            idx = tuple(i for i, u in enumerate(self.updates) if k in u)
            by.setdefault(idx, []).append(k)
        return [(keys, list(idx)) for idx, keys in by.items()]

    def norms(self) -> np.ndarray:
        """L2 norm of each client's whole update (inf when it holds NaN or inf)."""
        out = np.empty(len(self.updates))
        for i, u in enumerate(self.updates):
            sq = sum(float(np.square(v).sum()) for v in u.values())
            out[i] = np.sqrt(sq) if np.isfinite(sq) else np.inf
        return out


class Step:
    """A transform in the chain; ``cfg`` is its validated config (``fedmtl.aggregation.config``)."""

    stage: ClassVar[str] = "update"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @property
    def name(self) -> str:
        return str(self.cfg.name)

    def init(self) -> dict[str, Any]:
        return {}

    def apply(self, batch: Batch, state: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


#: step name -> class; filled by ``fedmtl.aggregation.steps`` and ``robust`` (and ``register_step``).
STEPS: dict[str, type[Step]] = {}


def register_step(name: str, config: type | None = None) -> Callable[[type[Step]], type[Step]]:
    """Class decorator: the step ``name`` of the ``aggregation:`` list. ``config``: its settings (a
    ``fedmtl.aggregation.config.StepConfig`` subclass with ``name: Literal[name]`` and a ``stage``),
    so a step written outside the package is one file."""

    def deco(cls: type[Step]) -> type[Step]:
        STEPS[name] = cls
        if config is not None:
            from fedmtl.aggregation.config import STEP_TYPES

            STEP_TYPES[name] = config
        return cls

    return deco


@dataclass
class AggResult:
    params: Arrays  # new values of the aggregated keys (reference + aggregate update)
    state: dict[str, Any]
    info: dict[str, Any]


class Pipeline:
    """A chain of steps; built from the ``aggregation:`` config list by ``build_pipeline``."""

    def __init__(self, steps: Sequence[Step]) -> None:
        self.steps = list(steps)
        #: a chain whose mean divides by a fixed expected count releases a result even when no client
        #: replied (DP-FedAvg under Poisson sampling: then only its noise), so the server runs it
        self.releases_when_empty = any(getattr(s.cfg, "expected", None) is not None for s in self.steps)

    def __repr__(self) -> str:
        return f"Pipeline({[s.name for s in self.steps]})"

    def init(self) -> dict[str, Any]:
        return {str(i): s.init() for i, s in enumerate(self.steps)}

    def state_of(self, state: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
        """The state of the first step called ``name`` (e.g. the adaptive clip bound)."""
        state = state or self.init()
        for i, s in enumerate(self.steps):
            if s.name == name:
                return state.get(str(i), {})
        return None

    def run(
        self,
        reference: Arrays,
        updates: Mapping[int, Arrays],
        weights: Mapping[int, float],
        *,
        seed: int,
        round: int,
        state: dict[str, Any] | None = None,
        scalars: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> AggResult:
        """Aggregate client arrays ``updates`` (server key names, each a subset of ``reference``'s
        keys) into new values for every key at least one client carries."""
        if not updates and not self.releases_when_empty:
            raise ProtocolError("aggregation: no client updates to aggregate")
        cids = sorted(updates)
        deltas = []
        for c in cids:
            d = {}
            for k, v in updates[c].items():
                if k not in reference:
                    raise ProtocolError(f"aggregation: client {c} sent unknown key {k!r}")
                d[k] = np.asarray(v, dtype=np.float64) - reference[k].astype(np.float64)
            deltas.append(d)
        batch = Batch(
            cids=cids,
            updates=deltas,
            weights=np.array([float(weights[c]) for c in cids], dtype=np.float64),
            reference=reference,
            rng=np.random.default_rng([seed, AGG_RNG, round]),
            scalars=[(scalars or {}).get(c, {}) for c in cids],
        )
        state = dict(state) if state else self.init()
        for i, step in enumerate(self.steps):
            state[str(i)] = step.apply(batch, state.get(str(i), step.init()))
        assert batch.aggregate is not None, "a pipeline always ends with a reduce step"
        out: Arrays = {}
        skipped = []
        for k, d in batch.aggregate.items():
            if not np.isfinite(d).all():  # a reducer overwhelmed by bad updates: keep the old value
                skipped.append(k)
                continue
            out[k] = (reference[k].astype(np.float64) + d).astype(reference[k].dtype)
        if skipped:
            batch.info["non_finite_keys"] = skipped
        return AggResult(out, state, batch.info)


def build_pipeline(steps_cfg: Sequence[Any]) -> Pipeline | None:
    """The chain for an ``aggregation:`` list; None for the empty list (plain weighted mean).

    A chain without a reduce step gets a sample-weighted ``mean`` before its first aggregate step."""
    if not steps_cfg:
        return None
    from fedmtl.aggregation import robust, steps  # noqa: F401  (registers the built-in steps)
    from fedmtl.aggregation.config import MeanStep

    cfgs = list(steps_cfg)
    if not any(c.stage == "reduce" for c in cfgs):
        at = next((i for i, c in enumerate(cfgs) if c.stage == "aggregate"), len(cfgs))
        cfgs.insert(at, MeanStep())
    return Pipeline([STEPS[c.name](c) for c in cfgs])
