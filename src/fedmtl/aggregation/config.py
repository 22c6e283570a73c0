"""``aggregation:``: the server's chain of transforms over client updates (schemas only, so the
config loads without the aggregation code).

An aggregation chain is a YAML list of steps, each ``{name: <step>, <key>: <value>, ...}``. Steps
run in three stages: *update* steps change each client's update (``clip``), one *reduce* step
turns the updates into one (``mean``, ``median``, ``trimmed_mean``, ``krum``, ``multi_krum``,
``gradient_projection``), *aggregate* steps change that result (``gaussian_noise``,
``retention``). Without a reduce step a sample-weighted ``mean`` is implied; the empty list is
exactly the sample-weighted FedAvg mean. Every error is one line naming the step, the key and what
is allowed."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Field, SerializeAsAny, ValidationError, model_validator

from fedmtl.config_base import Strict


class StepConfig(Strict):
    """Base of every step's settings; ``stage`` places the step in the chain."""

    name: str
    stage: ClassVar[Literal["update", "reduce", "aggregate"]] = "update"


class ClipStep(StepConfig):
    """Scale each client update down to L2 norm ``max_norm`` (the whole update, every key)."""

    name: Literal["clip"] = "clip"
    max_norm: float = Field(1.0, gt=0)
    #: adaptive clipping (Andrew et al. 2021): move the bound toward the ``target_quantile`` of norms
    adaptive: bool = False
    target_quantile: float = Field(0.5, gt=0, lt=1)
    lr: float = Field(0.2, gt=0, description="geometric step of the adaptive bound")
    #: std of Gaussian noise on the count of unclipped updates (DP for the adaptive bound)
    count_noise_std: float = Field(0.0, ge=0)
    #: the private estimate of Andrew et al.: the clip bits are centred (b - 1/2, sensitivity 1/2),
    #: noised, and divided by this public count (the expected clients per round) instead of by the
    #: number of updates, which is private under add/remove neighbours (None: that number)
    expected_count: float | None = Field(None, gt=0)


class MeanStep(StepConfig):
    name: Literal["mean"] = "mean"
    stage: ClassVar[Literal["update", "reduce", "aggregate"]] = "reduce"
    weighting: Literal["samples", "uniform"] = "samples"
    #: uniform weighting: divide each sum by this many clients, the expected number under Poisson
    #: sampling, instead of the number that replied (DP-FedAvg's fixed-denominator estimate: one
    #: client's share is then public, 1 / expected); keys nobody sent get a zero sum
    expected: float | None = Field(None, gt=0)
    #: per task, the expected clients of that task (its ``<task>:head.*`` keys); others: ``expected``
    expected_by_task: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fixed_needs_uniform(self) -> MeanStep:
        if self.expected is not None and self.weighting != "uniform":
            raise ValueError("expected (a fixed denominator) needs weighting 'uniform'")
        return self


class MedianStep(StepConfig):
    """Coordinate-wise median (Yin et al. 2018): tolerates fewer than half arbitrary updates."""

    name: Literal["median"] = "median"
    stage: ClassVar[Literal["update", "reduce", "aggregate"]] = "reduce"


class TrimmedMeanStep(StepConfig):
    """Coordinate-wise mean after dropping the ``trim`` fraction of largest and of smallest values."""

    name: Literal["trimmed_mean"] = "trimmed_mean"
    stage: ClassVar[Literal["update", "reduce", "aggregate"]] = "reduce"
    trim: float = Field(0.2, ge=0, lt=0.5)


class KrumStep(StepConfig):
    """Krum (Blanchard et al. 2017): the update closest to its n - f - 2 nearest neighbours."""

    name: Literal["krum"] = "krum"
    stage: ClassVar[Literal["update", "reduce", "aggregate"]] = "reduce"
    f: int = Field(1, ge=0, description="number of Byzantine updates assumed")


class MultiKrumStep(StepConfig):
    """Multi-Krum: the sample-weighted mean of the ``m`` best-scored updates (default n - f)."""

    name: Literal["multi_krum"] = "multi_krum"
    stage: ClassVar[Literal["update", "reduce", "aggregate"]] = "reduce"
    f: int = Field(1, ge=0)
    m: int | None = Field(None, ge=1)


class GradientProjectionStep(StepConfig):
    """FedBone's GPAggregation (``fedmtl.aggregation.gradient_projection``) over client updates."""

    name: Literal["gradient_projection"] = "gradient_projection"
    stage: ClassVar[Literal["update", "reduce", "aggregate"]] = "reduce"
    rescale: bool = True
    project: bool = True
    weighting: Literal["samples", "uniform"] = "uniform"


class GaussianNoiseStep(StepConfig):
    """Gaussian noise on the aggregate: absolute ``std``, or ``noise_multiplier`` x clip bound x the
    largest weight share of one client (the mean's L2 sensitivity), as DP-FedAvg does."""

    name: Literal["gaussian_noise"] = "gaussian_noise"
    stage: ClassVar[Literal["update", "reduce", "aggregate"]] = "aggregate"
    std: float | None = Field(None, ge=0)
    noise_multiplier: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_of(self) -> GaussianNoiseStep:
        if (self.std is None) == (self.noise_multiplier is None):
            raise ValueError("give exactly one of std, noise_multiplier")
        return self


class RetentionStep(StepConfig):
    """FDRMFL's retention blend (``fedmtl.aggregation.retention``): keep a share of the old model."""

    name: Literal["retention"] = "retention"
    stage: ClassVar[Literal["update", "reduce", "aggregate"]] = "aggregate"
    retention: float = Field(0.1, ge=0, le=1)


STEP_TYPES: dict[str, type[StepConfig]] = {
    cls.model_fields["name"].default: cls
    for cls in (
        ClipStep,
        MeanStep,
        MedianStep,
        TrimmedMeanStep,
        KrumStep,
        MultiKrumStep,
        GradientProjectionStep,
        GaussianNoiseStep,
        RetentionStep,
    )
}


def _parse_step(raw: Any) -> StepConfig:
    if isinstance(raw, StepConfig):
        return raw
    if isinstance(raw, str):  # shorthand: "median"
        raw = {"name": raw}
    allowed = ", ".join(sorted(STEP_TYPES))
    if not isinstance(raw, dict) or "name" not in raw:
        raise ValueError(f"each step is a mapping with a 'name' (one of {allowed})")
    cls = STEP_TYPES.get(raw["name"])
    if cls is None:
        raise ValueError(f"unknown aggregation step {raw['name']!r}; allowed: {allowed}")
    unknown = sorted(set(raw) - set(cls.model_fields))
    if unknown:
        keys = ", ".join(sorted(cls.model_fields))
        raise ValueError(f"unknown key {unknown[0]!r} for step {raw['name']!r}; allowed keys: {keys}")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        msg = msg[:1].lower() + msg[1:]
        value = f" = {err.get('input')!r}" if where else ""
        raise ValueError(f"step {raw['name']!r}: {where}{value}: {msg}" if where else msg) from None


def _check_order(steps: list[StepConfig]) -> list[StepConfig]:
    order = {"update": 0, "reduce": 1, "aggregate": 2}
    reducers = [s.name for s in steps if s.stage == "reduce"]
    if len(reducers) > 1:
        raise ValueError(f"at most one reduce step ({', '.join(reducers)} given)")
    for a, b in zip(steps, steps[1:], strict=False):
        if order[a.stage] > order[b.stage]:
            raise ValueError(
                f"step {b.name!r} ({b.stage} stage) cannot follow {a.name!r} ({a.stage} stage); "
                "order: clip, then one reducer, then gaussian_noise/retention"
            )
    for i, s in enumerate(steps):
        if isinstance(s, GaussianNoiseStep) and s.noise_multiplier is not None:
            if not any(isinstance(p, ClipStep) for p in steps[:i]):
                raise ValueError("gaussian_noise with noise_multiplier needs a clip step before it")
            if reducers and reducers[0] != "mean":
                raise ValueError(
                    f"gaussian_noise with noise_multiplier needs the mean reducer, not {reducers[0]!r}"
                )
    return steps


#: One step of the aggregation chain, e.g. ``{name: clip, max_norm: 1.0}``; empty list = weighted mean.
AggregationSteps = Annotated[
    list[Annotated[SerializeAsAny[StepConfig], BeforeValidator(_parse_step)]], AfterValidator(_check_order)
]
