"""Feature ``selection:``: client-side sample selection (config, checks, behaviour; the detectors
and score vectors are in ``fedmtl.selection``). Each client trains only on the samples it keeps.

Per round, from ``selection.start_round`` on, a sampled client scores its own training samples
with the model it received (``scores.py``), decides which to keep, and hands the kept subset to
the wrapped algorithm's client step (so FedAvg weights its update by the kept count). Everything
the two sides exchange rides in the ordinary messages under ``sel.`` names, so selection runs on
the simulator and on Flower alike:

- global detectors (``mode: global``): in refit rounds (``start_round`` and every ``refit_every``
  rounds after) each sampled client adds its score vectors (``sel.scores``, n x features floats;
  never samples) to its reply; the server fits one OneClassSVM / IsolationForest on the pooled
  vectors and broadcasts it as arrays (``sel.det.*``); clients apply it to their current scores;
- local detectors (``mode: local``): each client fits its own on its own scores and keeps it in
  its state; nothing extra leaves the client;
- the adaptive threshold (``method: threshold``): clients report min/max/sum/count of their kept
  losses (scalars), the server moves the threshold and broadcasts it (``sel.tau``);
- near-duplicates (``dedup``) are found on the client's own encoder codes.

A floor keeps at least ``min_keep`` of every client's samples (the most inlying ones), and the
clients where it acted are listed in the round row. Clients whose data carries the corruption
harness's ground truth also report how many bad samples they dropped (simulation only), which
gives detection precision and recall per round."""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from fedmtl.algorithms.base import Algorithm, ClientWork, Expected, Message
from fedmtl.algorithms.message import OptionalKey
from fedmtl.algorithms.reduce import Aggregate, Reduce
from fedmtl.algorithms.wrapper import AlgorithmWrapper
from fedmtl.config_base import Strict
from fedmtl.data.corrupt import KIND_NAMES, Corruption
from fedmtl.data.federated import ClientData, FederatedData
from fedmtl.errors import ConfigError, ProtocolError
from fedmtl.selection import detectors
from fedmtl.selection.scores import forward_parts, has_decoder, near_duplicates, score_vectors
from fedmtl.training.tensors import Arrays
from fedmtl.training.work import Train, Trained, local_work

if TYPE_CHECKING:
    from fedmtl.config import Config

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


KEY = "_selection"  # this wrapper's part of the server state and of each client's state
PREFIX = "sel."
DET = "sel.det."
SCORES = "sel.scores"
TAU = "sel.tau"
RNG_SELECT = 21  # rng purpose (next to the simulator's 1-3 and evaluation's 8)
BAD_KINDS = {k: v for k, v in KIND_NAMES.items() if k != 0}


def _strip(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != KEY}


def _mine(d: dict[str, Any]) -> dict[str, Any]:
    return {k[len(PREFIX) :]: v for k, v in d.items() if k.startswith(PREFIX)}


def _without_mine(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not k.startswith(PREFIX)}


class SampleSelection(AlgorithmWrapper):
    def __init__(self, inner: Algorithm, cfg: SelectionConfig, seed: int, w_ce: float) -> None:
        super().__init__(inner)
        self.cfg = cfg
        self.seed = seed
        self.w_ce = w_ce

    # --- helpers -----------------------------------------------------------------------------
    def _refit_round(self, round: int) -> bool:
        c = self.cfg
        return round >= c.start_round and (round - c.start_round) % c.refit_every == 0

    def _loss(self, scores: np.ndarray) -> np.ndarray:
        """A sample's scalar loss: the sum of its ce and recon scores (w_ce * CE + MSE)."""
        cols = [i for i, f in enumerate(self.cfg.features) if f in ("ce", "recon")] or [0]
        return scores[:, cols].sum(1)

    def _fit(self, vectors: np.ndarray, seed: int) -> Arrays:
        c = self.cfg
        det = detectors.fit(c.method, vectors, c.nu, c.contamination, c.n_estimators, seed)
        det["loss_median"] = np.array([float(np.median(self._loss(vectors)))])
        return det

    def _global_detector(self) -> bool:
        return self.cfg.method in ("ocsvm", "iforest") and self.cfg.mode == "global"

    # --- server side -------------------------------------------------------------------------
    def init_server(self) -> dict[str, Any]:
        sel = {"det": {}, "fit_round": 0, "fit_vectors": 0, "r": 0.0, "tau": None, "hist": [], "stats": {}}
        return {**self.inner.init_server(), KEY: sel}

    def broadcast(self, server: dict[str, Any], cid: int) -> Message:
        msg = self.inner.broadcast(_strip(server), cid)
        sel = server[KEY]
        arrays = dict(msg.arrays)
        scalars = dict(msg.scalars)
        if sel["det"]:
            arrays.update({DET + k: v for k, v in sel["det"].items()})
        if sel["tau"] is not None:
            scalars[TAU] = float(sel["tau"])
        return Message(arrays=arrays, scalars=scalars)

    def expected_reply(self, server: dict[str, Any], cid: int, sent: Message) -> Expected | None:
        """The inner algorithm's reply to what it sent, plus this client's score vectors (in refit
        rounds of a global detector)."""
        inner_sent = Message(arrays=_without_mine(sent.arrays), scalars=_without_mine(sent.scalars))
        expected = self.inner.expected_reply(_strip(server), cid, inner_sent)
        if expected is None:
            return None
        return {**expected, SCORES: OptionalKey((None, len(self.cfg.features)))}

    def reduction(self, server: dict[str, Any], replies: dict[int, Message], round: int) -> Reduce | None:
        """The inner algorithm's reduction of the replies without this feature's parts; the score
        vectors come back beside the aggregate (``Reduce.side``) for the server's detector."""
        inner_replies = {
            cid: Message(arrays=_without_mine(m.arrays), scalars=_without_mine(m.scalars))
            for cid, m in replies.items()
        }
        request = self.inner.reduction(_strip(server), inner_replies, round)
        if request is None or request.kind != "mean":
            return request
        return replace(request, replies={c: replies[c] for c in request.replies}, side=frozenset({SCORES}))

    def server_update(self, server: dict[str, Any], aggregate: Aggregate, round: int) -> dict[str, Any]:
        replies = aggregate.replies
        inner_replies = {
            cid: Message(arrays=_without_mine(m.arrays), scalars=_without_mine(m.scalars))
            for cid, m in replies.items()
        }
        new = self.inner.server_update(_strip(server), replace(aggregate, replies=inner_replies), round)
        sel = dict(server[KEY])
        sel["stats"] = self._stats(replies, round)
        if self._global_detector():
            self._fit_global(sel, replies, round)
        if self.cfg.method == "threshold":
            self._update_threshold(sel, replies)
        if sel["tau"] is not None:
            sel["stats"]["selection_tau"] = float(sel["tau"])
            sel["stats"]["selection_ratio"] = float(sel["r"])
        if sel["det"]:
            sel["stats"]["selection_fit_round"] = int(sel["fit_round"])
        return {**new, KEY: sel}

    def _fit_global(self, sel: dict[str, Any], replies: dict[int, Message], round: int) -> None:
        vectors = []
        for cid in sorted(replies):
            s = replies[cid].arrays.get(SCORES)
            if s is None:
                continue
            if s.ndim != 2 or s.shape[1] != len(self.cfg.features):
                raise ProtocolError(
                    f"selection: client {cid} sent score vectors of shape {s.shape}, "
                    f"expected (n, {len(self.cfg.features)})"
                )
            vectors.append(s)
        pooled = np.concatenate(vectors) if vectors else np.zeros((0, len(self.cfg.features)))
        if len(pooled) < 10:
            return
        rng = np.random.default_rng([self.seed, RNG_SELECT, round])
        if len(pooled) > self.cfg.max_fit_samples:
            pooled = pooled[np.sort(rng.choice(len(pooled), self.cfg.max_fit_samples, replace=False))]
        sel["det"] = self._fit(pooled, int(rng.integers(2**31)))
        sel["fit_round"] = round
        sel["fit_vectors"] = len(pooled)

    def _update_threshold(self, sel: dict[str, Any], replies: dict[int, Message]) -> None:
        """FedBalancer-style: tau = L_low + r (L_high - L_low); r moves by +-step every window."""
        stats = [_mine(m.scalars) for m in replies.values()]
        stats = [s for s in stats if float(s.get("u_count", 0)) > 0]
        if not stats:
            return
        low = min(float(s["u_min"]) for s in stats)
        high = float(np.mean([float(s["u_max"]) for s in stats]))
        hist = [*sel["hist"], sum(float(s["u_sum"]) for s in stats) / sum(float(s["u_count"]) for s in stats)]
        w = self.cfg.window
        r = float(sel["r"])
        if len(hist) >= 2 * w and len(hist) % w == 0:
            previous, latest = float(np.mean(hist[-2 * w : -w])), float(np.mean(hist[-w:]))
            r = min(1.0, max(0.0, r + (self.cfg.step if previous > latest else -self.cfg.step)))
        sel.update(hist=hist[-2 * w :] if len(hist) % w == 0 else hist, r=r, tau=low + r * (high - low))

    def _stats(self, replies: dict[int, Message], round: int) -> dict[str, Any]:
        per = {cid: _mine(m.scalars) for cid, m in replies.items()}
        per = {cid: s for cid, s in per.items() if "n" in s}
        if not per:
            return {}
        tot = {k: sum(float(s.get(k, 0)) for s in per.values()) for k in ("n", "kept", "bad", "tp")}
        dropped = tot["n"] - tot["kept"]
        out: dict[str, Any] = {
            "selection_clients": len(per),
            "selection_samples": int(tot["n"]),
            "selection_kept": int(tot["kept"]),
            "selection_kept_fraction": tot["kept"] / tot["n"] if tot["n"] else 1.0,
            "selection_floor_clients": sorted(cid for cid, s in per.items() if int(s.get("floor", 0))),
        }
        if any("bad" in s for s in per.values()):
            out.update(
                selection_bad=int(tot["bad"]),
                selection_true_drops=int(tot["tp"]),
                selection_precision=tot["tp"] / dropped if dropped else float("nan"),
                selection_recall=tot["tp"] / tot["bad"] if tot["bad"] else float("nan"),
            )
            for name in BAD_KINDS.values():
                bad = sum(float(s.get(f"bad_{name}", 0)) for s in per.values())
                if bad:
                    tp = sum(float(s.get(f"tp_{name}", 0)) for s in per.values())
                    out[f"selection_recall_{name}"] = tp / bad
                    out[f"selection_bad_{name}"] = int(bad)
                    out[f"selection_true_drops_{name}"] = int(tp)
        return out

    def global_params(self, server: dict[str, Any]) -> Arrays | None:
        return self.inner.global_params(_strip(server))

    def round_info(self, server: dict[str, Any]) -> dict[str, Any]:
        return {**self.inner.round_info(_strip(server)), **server[KEY]["stats"]}

    def stop_reason(self, server: dict[str, Any], round: int) -> str | None:
        return self.inner.stop_reason(_strip(server), round)

    def eval_arrays(
        self, server: dict[str, Any], state: dict[str, Any], cid: int, data: ClientData | None = None
    ) -> Arrays:
        return self.inner.eval_arrays(_strip(server), _strip(state), cid, data)

    def shared_eval_arrays(self, server: dict[str, Any], state: dict[str, Any], cid: int) -> Arrays | None:
        return self.inner.shared_eval_arrays(_strip(server), _strip(state), cid)

    def new_client_arrays(self, server: dict[str, Any], cid: int) -> Arrays:
        return self.inner.new_client_arrays(_strip(server), cid)

    # --- client side -------------------------------------------------------------------------
    def _score_arrays(self, state: dict[str, Any], data: ClientData, msg: Message) -> Arrays:
        """The model the client scores with: what it received, completed by its own personal
        parameters (FedPer's head, a local model) and the initial ones for anything missing."""
        arrays: Arrays = dict(self.ctx.init_for(data.task.name))
        if isinstance(state.get("params"), dict):
            arrays.update(state["params"])
        arrays.update(msg.arrays)
        if isinstance(state.get("head"), dict):
            arrays.update(state["head"])
        return arrays

    def _prepare(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> tuple[dict[str, Any], ClientData, Message, Message, dict[str, Any]]:
        """(inner state, data to train on, inner message, extra reply, own state)."""
        inner_state = _strip(state)
        own = dict(state.get(KEY, {}))
        inner_msg = Message(arrays=_without_mine(msg.arrays), scalars=_without_mine(msg.scalars))
        n = data.n_train
        c = self.cfg
        if work.round < c.start_round or n == 0:
            return inner_state, data, inner_msg, Message(), own
        model = self.ctx.model_for(data.task.name)
        parts = forward_parts(
            model, self._score_arrays(inner_state, data, inner_msg), data.x_train, data.y_train
        )
        scores = score_vectors(parts, data.y_train, list(c.features), self.w_ce)
        keep = np.ones(n, dtype=bool)
        rank = np.zeros(n)  # higher = more inlying; used by the floor
        extra = Message()
        if c.method in ("ocsvm", "iforest"):
            det: Arrays | None = None
            if c.mode == "global":
                if self._refit_round(work.round):
                    extra.arrays[SCORES] = scores.astype(np.float32)
                det = {k[len(DET) :]: v for k, v in msg.arrays.items() if k.startswith(DET)} or None
            else:
                det = own.get("det") or None
                if n >= 10 and (det is None or work.round - int(own.get("fit_round", 0)) >= c.refit_every):
                    rng = np.random.default_rng([self.seed, RNG_SELECT, work.round, data.cid])
                    fit_on = scores
                    if n > c.max_fit_samples:
                        fit_on = scores[np.sort(rng.choice(n, c.max_fit_samples, replace=False))]
                    det = self._fit(fit_on, int(rng.integers(2**31)))
                    own.update(det=det, fit_round=work.round)
            if det is not None:
                rank = detectors.decision(det, scores)
                keep = rank >= 0
                if c.one_sided and "loss_median" in det:
                    keep |= self._loss(scores) <= float(det["loss_median"][0])
        elif c.method == "threshold":
            u = self._loss(scores)
            rank = -u
            tau = msg.scalars.get(TAU)
            if tau is not None:
                rng = np.random.default_rng([self.seed, RNG_SELECT, work.round, data.cid])
                keep = (u < float(tau)) | (rng.random(n) < c.keep_prob)
        if c.dedup:
            dup = near_duplicates(parts.code, c.dedup_eps)
            keep &= ~dup
            rank = np.where(dup, -np.inf, rank)
        need = min(n, max(1, math.ceil(c.min_keep * n)))
        floor = int(keep.sum() < need)
        if floor:
            keep[np.argsort(-rank, kind="stable")[:need]] = True
        if c.method == "threshold":
            u_kept = u[keep]
            extra.scalars.update(
                {
                    "sel.u_min": float(u_kept.min()),
                    "sel.u_max": float(u_kept.max()),
                    "sel.u_sum": float(u_kept.sum()),
                    "sel.u_count": int(keep.sum()),
                }
            )
        extra.scalars.update({"sel.n": n, "sel.kept": int(keep.sum()), "sel.floor": floor})
        truth = data.corruption
        if truth is not None and len(truth.kind) == n:
            bad = truth.bad
            extra.scalars.update({"sel.bad": int(bad.sum()), "sel.tp": int((bad & ~keep).sum())})
            for code, name in BAD_KINDS.items():
                m = truth.kind == code
                if m.any():
                    extra.scalars[f"sel.bad_{name}"] = int(m.sum())
                    extra.scalars[f"sel.tp_{name}"] = int((m & ~keep).sum())
        if keep.all():
            return inner_state, data, inner_msg, extra, own
        sub_truth = (
            Corruption(truth.kind[keep], truth.label[keep], truth.source[keep])
            if truth is not None and len(truth.kind) == n
            else None
        )
        sub = replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep], corruption=sub_truth)
        return inner_state, sub, inner_msg, extra, own

    @staticmethod
    def _finish(
        new_state: dict[str, Any], reply: Message, extra: Message, own: dict[str, Any]
    ) -> tuple[dict[str, Any], Message]:
        state = {**new_state, KEY: own} if own else dict(new_state)
        return state, Message(
            arrays={**reply.arrays, **extra.arrays}, scalars={**reply.scalars, **extra.scalars}
        )

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> Generator[Train, Trained, tuple[dict[str, Any], Message]]:
        inner_state, sub, inner_msg, extra, own = self._prepare(state, data, msg, work)
        new_state, reply = yield from local_work(self.inner.client_step(inner_state, sub, inner_msg, work))
        return self._finish(new_state, reply, extra, own)


def wrap(algo: Algorithm, cfg: Config, data: FederatedData) -> Algorithm:
    sc = cfg.selection
    if not all(t.is_classification for t in data.tasks.values()):
        raise ConfigError("config: selection.enabled = True: sample selection needs classification tasks")
    model = algo.ctx.model
    if "recon" in sc.features and not has_decoder(model):
        raise ConfigError(
            f"config: selection.features = {list(sc.features)}: 'recon' needs model.name = 'autoencoder' "
            f"(model {cfg.model.name!r} has no decoder); use features [ce] or [ce, centre]"
        )
    if cfg.privacy.enabled and cfg.privacy.level == "sample":
        raise ConfigError(
            "config: selection.enabled = True: sample-level DP accounts each step as sampling batch/n "
            "of a client's n records, but selection picks the records it trains on from the data itself; "
            "disable one of them"
        )
    if sc.mode == "global" and sc.method in ("ocsvm", "iforest") and cfg.secagg.enabled:
        raise ConfigError(
            "config: selection.mode = 'global': per-client score vectors cannot pass secure aggregation; "
            "use selection.mode = 'local'"
        )
    w_ce = sc.w_ce if sc.w_ce is not None else float(getattr(model, "w_ce", 1.0))
    return SampleSelection(algo, sc, cfg.seed, w_ce)
