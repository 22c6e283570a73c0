"""``selection:``: client-side sample selection (see docs/selection.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fedmtl.config_base import Strict

Feature = Literal["ce", "recon", "centre"]


class SelectionConfig(Strict):
    enabled: bool = False
    #: ocsvm / iforest: anomaly detector on per-sample score vectors; threshold: the adaptive
    #: loss-threshold controller (FedBalancer-style); none: only the duplicate filter (``dedup``)
    method: Literal["ocsvm", "iforest", "threshold", "none"] = "ocsvm"
    #: global: clients send their score vectors in refit rounds, the server fits one detector and
    #: ships it back; local: each client fits its own (nothing but the model update leaves it)
    mode: Literal["global", "local"] = "global"
    #: score vector: w_ce * cross-entropy, reconstruction MSE (autoencoder), distance of the code
    #: to its class centre (the client's own per-class mean code)
    features: list[Feature] = Field(default_factory=lambda: ["ce", "recon"])
    #: first round in which clients score their samples; selection applies from then on (global
    #: detectors and the threshold controller from the round after, once fitted)
    start_round: int = Field(5, ge=1)
    #: detectors are refitted every k rounds after ``start_round``
    refit_every: int = Field(5, ge=1)
    #: OneClassSVM's nu (upper bound on the fraction of training vectors flagged)
    nu: float = Field(0.4, gt=0, lt=1)
    #: IsolationForest's contamination (fraction flagged on the fitting vectors)
    contamination: float = Field(0.4, gt=0, le=0.5)
    #: IsolationForest trees; default ceil(sqrt(vectors fitted on)), as in the authors' code
    n_estimators: int | None = Field(None, ge=1)
    #: the server (or client) fits on at most this many vectors (seeded subsample; OCSVM is O(n^2))
    max_fit_samples: int = Field(4000, ge=10)
    #: ocsvm/iforest: drop a flagged sample only if its loss (the sum of its ce and recon scores)
    #: is above the median loss of the vectors the detector was fitted on, so unusually *easy*
    #: samples are never dropped. false = the paper's rule (drop whatever the detector flags)
    one_sided: bool = False
    #: threshold method: probability of keeping a sample whose loss is above the threshold
    keep_prob: float = Field(0.75, ge=0, le=1)
    #: threshold method: rounds per window and step of the threshold ratio r
    window: int = Field(5, ge=1)
    step: float = Field(0.1, gt=0, le=1)
    #: drop near-duplicates: samples whose code lies within dedup_eps * (median nearest-neighbour
    #: distance) of an earlier sample of the same client
    dedup: bool = False
    dedup_eps: float = Field(0.01, gt=0, le=1)
    #: floor: a client always keeps at least this fraction of its samples (and at least one); the
    #: most inlying ones are restored when a detector drops more
    min_keep: float = Field(0.1, gt=0, le=1)
    #: weight of the cross-entropy in the score vector; default: the autoencoder's w_ce (else 1)
    w_ce: float | None = Field(None, gt=0)

    @field_validator("features")
    @classmethod
    def _features(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one of 'ce', 'recon', 'centre'")
        if len(set(v)) != len(v):
            raise ValueError("lists a feature twice")
        return v
