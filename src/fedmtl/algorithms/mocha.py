"""MOCHA (Smith et al. 2017) as a fedmtl algorithm: federated multi-task linear models.

Each client is one task: it keeps its data and its dual variables alpha_t (client state) and, per
round, runs floor(work_fraction * sdca_frac * n_t) SDCA steps on its local dual subproblem, then
sends one d-vector Delta b_t. The server keeps W (one row per task), B = [b_t] and the task
relationship Sigma = Omega^-1; it adds W += Sigma Delta B / lambda and, every ``inner`` rounds,
re-learns Omega in closed form (or keeps a fixed structure). Stragglers simply do fewer steps and
dropped clients send nothing: their alpha_t is not touched and nobody waits for them.

The math and the kernels live in ``fedmtl.mocha``; see docs/mocha.md.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
from pydantic import Field

from fedmtl.algorithms.base import AlgoContext, AlgoParams, Algorithm, ClientWork, Expected, Message
from fedmtl.algorithms.reduce import Aggregate, Reduce
from fedmtl.data.federated import ClientData
from fedmtl.errors import ConfigError
from fedmtl.mocha._jit import require as require_numba
from fedmtl.mocha.losses import Loss, get_loss
from fedmtl.mocha.omega import initial_structure, quad
from fedmtl.mocha.server import DEFAULT_LAMBDA, apply_update, relearn_omega
from fedmtl.training.tensors import Arrays

log = logging.getLogger(__name__)


class MochaParams(AlgoParams):
    lam: float = Field(
        DEFAULT_LAMBDA, gt=0, description="regularisation lambda of (lambda/2) tr(W Omega W^T)"
    )
    loss: Literal["auto", "hinge", "smooth_hinge", "squared"] = "auto"
    gamma: float = Field(1.0, gt=0, description="smoothing width of smooth_hinge")
    omega: Literal["learned", "identity", "independent", "mean", "clusters"] = "learned"
    omega_weight: float = Field(1.0, ge=0, description="mu of the mean / clusters structures")
    clusters: list[int] | None = None
    inner: int = Field(100, ge=1, description="rounds per W-phase: Omega is re-learned every inner rounds")
    omega_steps: int | None = Field(None, ge=0, description="stop re-learning Omega after this many updates")
    sdca_frac: float = Field(0.5, gt=0, description="SDCA steps per round as a fraction of n_t")
    reference_compat: bool = Field(False, description="keep W after an Omega-step (reference quirk Q3)")
    stale_after: int = Field(20, ge=1, description="rounds without a reply before a client is reported")


class Mocha(Algorithm):
    name = "mocha"
    Params = MochaParams
    has_global_model = False
    batchable = False
    reduces = "each"
    reduces_why = (
        "the server moves W by Sigma Delta B / lambda from the clients' dual steps; it never averages models"
    )

    def __init__(self, params: AlgoParams, ctx: AlgoContext) -> None:
        super().__init__(params, ctx)
        require_numba()
        p: MochaParams = self.p  # type: ignore[assignment]
        keys = set(ctx.init_arrays)
        if type(ctx.model).__name__ != "Linear" or keys != {"head.weight", "head.bias"}:
            raise ConfigError(
                f"config: model.name: algorithm 'mocha' trains one linear model per task and needs "
                f"model.name = 'linear', got a {type(ctx.model).__name__} model"
            )
        task = ctx.task
        if task.is_classification and task.num_outputs != 2:
            raise ConfigError(
                f"config: algorithm.name = 'mocha': binary classification only, this dataset has "
                f"{task.num_outputs} classes"
            )
        name = p.loss if p.loss != "auto" else ("hinge" if task.is_classification else "squared")
        self.loss: Loss = get_loss(name, p.gamma)
        if (self.loss.kind == "classification") != task.is_classification:
            raise ConfigError(f"config: algorithm.loss = {name!r}: does not fit a {task.kind} dataset")
        self.m = ctx.num_clients
        self.d = int(ctx.init_arrays["head.weight"].shape[1])
        initial_structure(p.omega, self.m, p.omega_weight, p.clusters)  # validate clusters early
        self._warned: set[int] = set()

    # --- server side -------------------------------------------------------------------------
    def init_server(self) -> dict[str, Any]:
        p: MochaParams = self.p  # type: ignore[assignment]
        s = initial_structure(p.omega, self.m, p.omega_weight, p.clusters)
        m, d = self.m, self.d
        return {
            "W": np.zeros((m, d)),
            "B": np.zeros((m, d)),
            "sigma": s.sigma,
            "omega": s.omega,
            "sigma_p": s.sigma_p,
            "loss_terms": np.zeros(m),  # each client's mean loss at the w_t it last received
            "dual_terms": np.zeros(m),  # each client's mean dual term at its current alpha_t
            "last_seen": np.zeros(m, dtype=np.int64),
            "omega_updates": 0,
            "primal": float("nan"),
            "dual": float("nan"),
            "gap": float("nan"),
            "objective_exact": False,
            "stale": [],
        }

    def broadcast(self, server: dict[str, Any], cid: int) -> Message:
        """w_t plus the two scalars of node t's subproblem: one d-vector down."""
        return Message(
            arrays={"w": server["W"][cid]},
            scalars={"sigma_tt": float(server["sigma"][cid, cid]), "sigma_p": float(server["sigma_p"])},
        )

    def eval_view(self, server: dict[str, Any], cid: int) -> dict[str, Any]:
        """Only w_t: the other rows of W are the other clients' personal models."""
        return {"w_own": server["W"][cid]}

    def expected_reply(self, server: dict[str, Any], cid: int, sent: Message) -> Expected:
        """One d-vector: the change of the client's b_t."""
        return {"delta_b": (self.d,)}

    def reduction(self, server: dict[str, Any], replies: dict[int, Message], round: int) -> Reduce:
        """Each client's dual step goes into its own row of Delta B: nothing is averaged."""
        return Reduce(replies, kind="each")

    def server_update(self, server: dict[str, Any], aggregate: Aggregate, round: int) -> dict[str, Any]:
        p: MochaParams = self.p  # type: ignore[assignment]
        replies = aggregate.replies
        s = dict(server)
        dB = np.zeros((self.m, self.d))
        loss_terms, dual_terms = s["loss_terms"].copy(), s["dual_terms"].copy()
        last_seen = s["last_seen"].copy()
        for cid, msg in replies.items():
            dB[cid] = np.asarray(msg.arrays["delta_b"], dtype=np.float64)
            loss_terms[cid] = float(msg.scalars["train_loss"])
            last_seen[cid] = round
        # Objectives of the state the clients started this round from (W, B, alpha before the update);
        # a client that did not reply contributes its last known loss term, so P is then approximate.
        s["primal"] = float(loss_terms.sum()) + 0.5 * p.lam * quad(s["omega"], s["W"])
        s["dual"] = float(dual_terms.sum()) - quad(s["sigma"], s["B"]) / (2 * p.lam)
        s["gap"] = s["primal"] - s["dual"]
        s["objective_exact"] = len(replies) == self.m
        for cid, msg in replies.items():
            dual_terms[cid] = float(msg.scalars["dual_term"])
        s["W"], s["B"] = apply_update(s["W"], s["B"], s["sigma"], dB, p.lam)
        s.update(loss_terms=loss_terms, dual_terms=dual_terms, last_seen=last_seen)
        s["stale"] = self._stale(last_seen, round)
        if self._omega_due(s, round):
            new, s["W"] = relearn_omega(s["W"], s["B"], p.lam, keep_w=p.reference_compat)
            s.update(
                sigma=new.sigma, omega=new.omega, sigma_p=new.sigma_p, omega_updates=s["omega_updates"] + 1
            )
        return s

    def _omega_due(self, s: dict[str, Any], round: int) -> bool:
        p: MochaParams = self.p  # type: ignore[assignment]
        if p.omega != "learned" or round % p.inner != 0:
            return False
        return p.omega_steps is None or s["omega_updates"] < p.omega_steps

    def _stale(self, last_seen: np.ndarray, round: int) -> list[int]:
        """Clients silent for ``stale_after`` rounds: MOCHA cannot converge while one never reports."""
        p: MochaParams = self.p  # type: ignore[assignment]
        if round < p.stale_after:
            return []
        stale = [int(c) for c in np.flatnonzero(round - last_seen >= p.stale_after)]
        for c in set(stale) - self._warned:
            log.warning(
                "mocha: client %d has sent nothing for %d rounds; convergence needs every client",
                c,
                p.stale_after,
            )
        self._warned |= set(stale)
        return stale

    def round_info(self, server: dict[str, Any]) -> dict[str, Any]:
        """Primal, dual and gap per round in metrics.jsonl's round rows."""
        return {
            "primal": server["primal"],
            "dual": server["dual"],
            "gap": server["gap"],
            "objective_exact": server["objective_exact"],
            "sigma_prime": float(server["sigma_p"]),
            "omega_updates": int(server["omega_updates"]),
            "stale_clients": list(server["stale"]),
        }

    # --- client side -------------------------------------------------------------------------
    def _labels(self, data: ClientData) -> np.ndarray:
        y = np.asarray(data.y_train, dtype=np.float64)
        return 2.0 * y - 1.0 if self.ctx.task.is_classification else y

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> tuple[dict[str, Any], Message]:
        from fedmtl.mocha.solver import local_sdca, task_terms  # compiled kernels: imported on first use

        p: MochaParams = self.p  # type: ignore[assignment]
        X = np.ascontiguousarray(data.x_train.reshape(data.n_train, -1), dtype=np.float64)
        y = self._labels(data)
        n = len(y)
        alpha = state.get("alpha")
        alpha = np.zeros(n) if alpha is None or len(alpha) != n else np.array(alpha, dtype=np.float64)
        w = np.asarray(msg.arrays["w"], dtype=np.float64).reshape(1, -1)
        offsets = np.array([0, n], dtype=np.int64)
        loss_before, _ = task_terms(X, y, offsets, w, alpha, self.loss.code, self.loss.gamma)
        k = int(np.floor(work.fraction * p.sdca_frac * n + 1e-9))
        dB = local_sdca(
            X,
            y,
            np.einsum("ij,ij->i", X, X),
            offsets,
            alpha,
            w,
            np.array([float(msg.scalars["sigma_tt"])]),
            float(msg.scalars["sigma_p"]),
            p.lam,
            work.rng.random(n),
            np.array([k], dtype=np.int64),
            self.loss.code,
            self.loss.gamma,
            1.0,
        )
        _, dual_after = task_terms(X, y, offsets, w, alpha, self.loss.code, self.loss.gamma)
        reply = Message(
            arrays={"delta_b": dB[0]},
            scalars={
                "num_examples": n,
                "steps": k,
                "samples": k,
                "train_loss": float(loss_before[0]),
                "dual_term": float(dual_after[0]),
            },
        )
        return {"alpha": alpha}, reply

    def eval_arrays(
        self, server: dict[str, Any], state: dict[str, Any], cid: int, data: ClientData | None = None
    ) -> Arrays:
        """w_t as the linear head: for 2 classes row 0 is zero, so argmax = class 1 iff w_t.x > 0."""
        init = self.ctx.init_arrays
        weight = np.zeros_like(init["head.weight"])
        weight[-1] = server["w_own"] if "w_own" in server else server["W"][cid]
        return {"head.weight": weight, "head.bias": np.zeros_like(init["head.bias"])}
