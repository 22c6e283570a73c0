"""The ``data:`` section: which dataset, how it is split into clients, and the corruption harness.

Kept apart from ``fedmtl.config`` (which imports every feature) so the data layer, and
``fedmtl datasets``, load without the training stack. ``data.corrupt`` is the seeded corruption
harness applied to clients' training splits: rates are fractions of each affected client's training
samples (taken before duplicates are appended); test splits and the global test set are never
touched, so accuracy stays honest."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedmtl.config_base import Strict


class BackdoorConfig(Strict):
    """A pixel trigger plus a target label on a fraction of the malicious clients' samples."""

    #: fraction of the training clients that are malicious (at least one when > 0)
    fraction: float = Field(0.0, ge=0, le=1)
    #: explicit malicious client ids (replaces ``fraction`` when given)
    clients: list[int] | None = None
    #: fraction of each malicious client's samples (whose label differs from ``target``) poisoned
    rate: float = Field(0.5, gt=0, le=1)
    target: int = Field(0, ge=0)
    #: side of the square trigger in pixels (images) or number of trailing features (vectors)
    size: int = Field(3, ge=1)
    #: value written into the trigger (1.0 is the brightest pixel of a [0, 1] image)
    value: float = 1.0


class CorruptConfig(Strict):
    enabled: bool = False
    #: fraction of training clients whose data gets label flips / open-set images / duplicates
    clients: float = Field(1.0, gt=0, le=1)
    #: symmetric label flipping (closed-set noise): label replaced by a different random class
    label_flip: float = Field(0.0, ge=0, lt=1)
    #: open-set noise: image replaced by an out-of-distribution one, label kept
    open_set: float = Field(0.0, ge=0, lt=1)
    #: 'photos': grey crops of scikit-learn's bundled natural photos; 'noise': uniform noise
    open_set_source: Literal["photos", "noise"] = "photos"
    #: redundant copies appended, as a fraction of the client's samples
    duplicate: float = Field(0.0, ge=0, le=4)
    #: near duplicates: Gaussian noise on each copy, its std this fraction of the client's input
    #: std (0: exact copies), clipped to the inputs' range, as an augmented copy would be
    duplicate_noise: float = Field(0.0, ge=0, le=1)
    backdoor: BackdoorConfig = BackdoorConfig()

    @model_validator(mode="after")
    def _disjoint(self) -> CorruptConfig:
        if self.label_flip + self.open_set >= 1:
            raise ValueError(
                f"label_flip + open_set = {self.label_flip + self.open_set:g}: must be below 1 "
                "(they corrupt disjoint samples)"
            )
        return self


class ConceptsConfig(Strict):
    """Concept shift between client groups (``fedmtl.data.concepts``): clients dealt into ``groups``
    whose labels are permuted or whose images are rotated, so populations conflict on shared inputs."""

    kind: Literal["label_permutation", "rotation"]
    groups: int = Field(4, ge=2)

    @model_validator(mode="before")
    @classmethod
    def _kind_given(cls, v: Any) -> Any:
        if isinstance(v, dict) and "kind" not in v:
            raise ValueError("needs kind: label_permutation or rotation")
        return v


PartitionKind = Literal[
    "iid", "dirichlet", "shards", "quantity", "target", "covariate", "resample", "natural"
]
#: what ``data.normalize`` may say; ``auto`` resolves per dataset (``fedmtl datasets`` lists it)
Normalize = Literal["auto", "standardize", "channel", "scale", "none"]


class PartitionConfig(Strict):
    #: None: the dataset's own clients for natural datasets (LEAF, landmine, ...), else dirichlet
    kind: PartitionKind | None = None
    num_clients: int = Field(10, ge=1)
    alpha: float = Field(0.5, gt=0)
    min_samples: int = Field(10, ge=1)
    classes_per_client: int = Field(2, ge=1)
    sigma: float = Field(1.0, ge=0)
    #: target / covariate: clients get contiguous ranges of the target or of the inputs' first
    #: principal component, sorted after adding seeded noise of this many standard deviations
    jitter: float = Field(0.25, ge=0)
    #: resample: each client draws this many samples (uniform in the range, train and test
    #: together) from the pool, with a Dirichlet(alpha) class mix; no sample twice in one client,
    #: clients may share samples. For populations larger than the pool (100,000 clients).
    samples: tuple[int, int] = (20, 50)

    @model_validator(mode="after")
    def _sample_range(self) -> PartitionConfig:
        lo, hi = self.samples
        if not 2 <= lo <= hi:
            raise ValueError(f"samples = {list(self.samples)}: needs 2 <= low <= high")
        return self


class DataConfig(Strict):
    dataset: str = "digits"
    dir: str | None = None
    #: LEAF: a data directory (``train/`` and ``test/`` shards, LEAF's own split) or one JSON file
    file: str | None = None
    partition: PartitionConfig = PartitionConfig()
    test_fraction: float = Field(0.25, gt=0, lt=1)
    #: each client's validation rows, carved from its training data (0: none); hyper-parameters and the
    #: best round are chosen on them (``fedmtl tune``). At most half: beyond that a client trains on
    #: fewer rows than it validates on (0.99 leaves one or two training rows per client)
    val_fraction: float = Field(0.0, ge=0, le=0.5)
    global_test_fraction: float = Field(0.2, gt=0, lt=1)
    #: standardize: per-feature (x - mean) / std; channel: the same per image channel (both from the
    #: clients' federated mean and variance, never pooled rows); scale: images divided by the
    #: dataset's pixel maximum, to [0, 1]; none: values as stored; auto: channel for images,
    #: standardize for vectors, none for text, written resolved into the run's config.yaml
    normalize: Normalize = "auto"
    #: the shape of one sample, e.g. [1, 28, 28] for flattened LEAF images (image models need it)
    input_shape: list[int] | None = Field(None, min_length=1)
    max_clients: int | None = Field(None, ge=1)
    tasks: list[str] | None = None
    holdout_clients: int = Field(0, ge=0)
    corrupt: CorruptConfig = CorruptConfig()
    #: concept shift between seeded client groups (label_permutation / rotation); None: no shift
    concepts: ConceptsConfig | None = None
    #: multi-modal datasets: client id -> modalities that client does not hold (zero-filled, masked)
    missing_modalities: dict[int, list[str]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _partition_follows_the_dataset(self) -> DataConfig:
        """Natural datasets (LEAF, landmine, ...) bring their clients; pooled ones are split by a
        Dirichlet label skew unless ``partition.kind`` says otherwise."""
        if self.partition.kind is None:
            from fedmtl.data.datasets import REGISTRY  # the registry reads files: imported on use

            spec = REGISTRY.get(self.dataset)
            if spec is not None:
                kind = "natural" if spec.kind == "natural" else "dirichlet"
                self.__dict__["partition"] = self.partition.model_copy(update={"kind": kind})
        return self

    @field_validator("normalize", mode="before")
    @classmethod
    def _boolean_normalize(cls, v: Any) -> Any:
        """``true``/``false`` (the older spelling) mean ``auto``/``none``."""
        if isinstance(v, bool):
            return "auto" if v else "none"
        return v

    @field_validator("input_shape")
    @classmethod
    def _positive_shape(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(d < 1 for d in v):
            raise ValueError(f"every dimension must be at least 1, got {v}")
        return v
