"""Feature ``privacy:``: differential privacy (config, checks, client and server behaviour;
the accountant is ``fedmtl.privacy.accountant``, DP-SGD ``fedmtl.training.dp_sgd``). See
docs/privacy.md.

**Client level** (DP-FedAvg, McMahan et al. 2018): every client clips its update (returned arrays
minus the arrays received) to the bound the server sent (``dp_clip``, fixed or adapted toward a
quantile of update norms, Andrew et al. 2021) and reports whether it was within it (``clip_bit``);
with ``noise_at: client`` it also adds its share N(0, sigma^2 / m) of the noise, so the m shares
sum to N(0, sigma^2) and nothing un-noised leaves it (``privatize_update``, which secure
aggregation composes with). The feature contributes the round's aggregation chain, which the round
runs on every algorithm's reduction (``fedmtl.runtime.reduction``): clip, uniform mean, Gaussian
noise of std ``z * C / m`` on the mean (``noise_at: server``), or only the uniform mean and the
adaptive bound (``noise_at: client``); adaptive clipping raises the update noise as
Andrew et al. prescribe so that both together cost ``noise_multiplier``. The accountant composes
one subsampled Gaussian per round; epsilon goes into every round row, and ``max_epsilon`` stops the
run before a round that would exceed it. DP-aggregated evaluation releases noisy metric means only.

**Sample level** (DP-SGD, Abadi et al. 2016): every training step a client's step declares becomes
a DP-SGD step (per-sample gradients clipped, Gaussian noise on their sum). Each client's records are
protected against everyone who sees its updates, the server included. The accountant composes, per
client, one Poisson-subsampled Gaussian per step (sampling rate batch_size / n_k: the usual
approximation for shuffled batches); the round row reports the largest epsilon over clients, and
``max_epsilon`` stops the run before a round in which some client could exceed it.

Everything crosses as message arrays and scalars, so the feature runs on Flower unchanged."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from fedmtl.aggregation.config import ClipStep, GaussianNoiseStep, MeanStep
from fedmtl.aggregation.pipeline import Batch, Step
from fedmtl.aggregation.steps import CLIP_BIT, Clip, GaussianNoise, Mean, adapt_bound
from fedmtl.algorithms.base import Algorithm, ClientWork, Message
from fedmtl.algorithms.reduce import Aggregate, Reduce
from fedmtl.algorithms.wrapper import AlgorithmWrapper, ReplyWrapper
from fedmtl.config_base import Strict
from fedmtl.data.federated import ClientData, FederatedData
from fedmtl.errors import ConfigError, ProtocolError
from fedmtl.runtime.reduction import CHAIN_STATE
from fedmtl.runtime.round import sample_size
from fedmtl.training.tensors import Arrays
from fedmtl.training.work import DPSGD, Train, Trained, map_requests

if TYPE_CHECKING:
    from fedmtl.config import Config


def epsilon(*args: Any, **kwargs: Any) -> float:
    """``fedmtl.privacy.accountant.epsilon``, imported on first use (dp-accounting takes half a
    second to import, which a run without DP should not pay)."""
    from fedmtl.privacy.accountant import epsilon as accountant_epsilon

    return accountant_epsilon(*args, **kwargs)


class PrivacyConfig(Strict):
    enabled: bool = False
    level: Literal["client", "sample"] = "client"
    #: std of the noise on the sum of clipped updates (client) or gradients (sample), over clip_norm
    noise_multiplier: float = Field(1.0, ge=0)
    #: L2 bound of one client's update (client) or one sample's gradient (sample); initial bound
    #: when ``clipping: adaptive``
    clip_norm: float = Field(1.0, gt=0)
    clipping: Literal["fixed", "adaptive"] = "fixed"
    #: adaptive clipping: quantile of update norms the bound tracks, and its geometric step size
    target_quantile: float = Field(0.5, gt=0, lt=1)
    clip_lr: float = Field(0.2, gt=0)
    #: adaptive clipping: std of the noise on the count of unclipped updates (default: the larger of
    #: clients per round / 20, as Andrew et al., and noise_multiplier, which raises the update noise
    #: by 15%); part of the privacy budget
    count_noise_std: float | None = Field(None, gt=0)
    #: where the Gaussian noise of client-level DP is added
    noise_at: Literal["server", "client"] = "server"
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "pld"] = "rdp"
    #: how the accountant models client sampling (client level): 'poisson' for ``clients.sampling:
    #: poisson`` (add/remove-one neighbours), 'without_replacement' for ``clients.sampling: fixed``
    #: (replace-one neighbours; rdp only). Default (null): the sampling that runs; any other value
    #: is refused. Sample level always accounts Poisson batches, which DP-SGD draws.
    sampling: Literal["poisson", "without_replacement"] | None = None
    #: stop before the round whose release would push epsilon above this
    max_epsilon: float | None = Field(None, gt=0)
    #: DP-aggregated evaluation (client level): instead of exact client metrics, each evaluation
    #: round releases only the mean of every metric in ``eval_metrics`` over the clients, each
    #: client's value clipped to [0, eval_bound], with Gaussian noise of std
    #: eval_noise_multiplier * eval_bound on the sum; the accountant composes these releases too
    eval_noise_multiplier: float | None = Field(None, gt=0)
    eval_metrics: list[str] = Field(default_factory=lambda: ["accuracy"], min_length=1)
    eval_bound: float = Field(1.0, gt=0)
    #: what the training clients' evaluation releases under client-level DP: 'private' (the noisy
    #: means of DP-aggregated evaluation; the default with eval_noise_multiplier), 'none' (nothing:
    #: clients do not evaluate, the run reports the server's own test set; the default otherwise),
    #: 'exact' (every client's exact metrics: a simulation oracle, not covered by epsilon, and
    #: labelled so in every round row)
    client_eval: Literal["private", "none", "exact"] | None = None

    @model_validator(mode="after")
    def _combinations(self) -> PrivacyConfig:
        if self.accountant == "pld" and self.sampling == "without_replacement":
            raise ValueError("sampling 'without_replacement' needs accountant 'rdp' (PLD supports 'poisson')")
        if self.level == "sample" and self.eval_noise_multiplier is not None:
            raise ValueError(
                "eval_noise_multiplier (DP-aggregated evaluation) protects clients: it needs level 'client'"
            )
        if self.level == "sample" and self.sampling == "without_replacement":
            raise ValueError("level 'sample' accounts batches as 'poisson' sampling")
        if (self.client_eval == "private") != (self.eval_noise_multiplier is not None) and (
            self.client_eval is not None
        ):
            raise ValueError(
                "client_eval 'private' is DP-aggregated evaluation: set it with eval_noise_multiplier, "
                "and 'none' or 'exact' without it"
            )
        if self.level == "sample" and self.client_eval is not None:
            raise ValueError("client_eval chooses what client-level DP releases: it needs level 'client'")
        return self

    @property
    def released_client_eval(self) -> str:
        """What the training clients' evaluation releases (client level): see ``client_eval``."""
        if self.client_eval is not None:
            return self.client_eval
        return "private" if self.eval_noise_multiplier is not None else "none"


#: what each ``client_eval`` mode releases, in the round rows
CLIENT_EVAL = {
    "private": "noisy clipped means (DP-aggregated evaluation, accounted)",
    "none": "nothing (clients do not evaluate)",
    "exact": "exact per-client metrics: a simulation oracle, not covered by epsilon",
}
#: what the accountant assumes (``privacy.sampling``) for each client sampler that can run
ACCOUNTED_AS = {"poisson": "poisson", "fixed": "without_replacement"}
#: the guarantee each reports, in the round rows
ACCOUNTING = {
    "poisson": "client-level, Poisson-sampled clients, add/remove-one neighbours",
    "without_replacement": "client-level, fixed-size sampling without replacement, replace-one neighbours",
    "sample": "record-level, Poisson batches of each client's records, add/remove-one, worst client",
}


def resolve_sampling(
    clients: str | None, privacy: PrivacyConfig, mean_of_updates: bool = True
) -> tuple[str, PrivacyConfig]:
    """(client sampling, privacy section with the accountant's sampling filled in): Poisson by
    default under client-level DP with server noise on an algorithm whose server takes the mean of
    the updates, fixed otherwise; a pairing that would report an epsilon for another mechanism than
    the one that runs is a config error."""
    client_dp = privacy.enabled and privacy.level == "client"
    # distributed noise (noise_at: client) is shared out over a known number of clients, and an
    # expected-count mean only stands in for a mean of the updates: fixed size otherwise
    poisson_fits = client_dp and privacy.noise_at == "server" and mean_of_updates
    sampling = clients or ("poisson" if poisson_fits else "fixed")
    if not client_dp:
        return sampling, privacy
    want = ACCOUNTED_AS[sampling]
    if privacy.sampling is not None and privacy.sampling != want:
        raise ConfigError(
            f"config: privacy.sampling = {privacy.sampling!r}: clients.sampling = {sampling!r} runs, "
            f"which the accountant models as {want!r}; leave privacy.sampling out (it follows the sampler)"
        )
    if want == "without_replacement" and privacy.accountant == "pld":
        raise ConfigError(
            "config: privacy.accountant = 'pld': models Poisson sampling only, and clients.sampling = "
            "'fixed' draws a fixed number of clients; use accountant 'rdp' or clients.sampling 'poisson'"
        )
    if sampling == "poisson" and privacy.noise_at == "client":
        raise ConfigError(
            "config: privacy.noise_at = 'client': each client adds its share of the noise for a known "
            "number of clients, which Poisson sampling varies; use clients.sampling 'fixed'"
        )
    return sampling, privacy.model_copy(update={"sampling": want})


DP_RNG = 13  # rng purpose of client-side noise: (seed, DP_RNG, round, cid)
DP_EVAL_RNG = 14  # rng purpose of the noise on released evaluation means: (seed, DP_EVAL_RNG, round)
CLIP_KEY = "dp_clip"


def update_norm(update: Arrays) -> float:
    return float(np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in update.values())))


def privatize_update(
    update: Arrays, clip: float, noise_std: float, rng: np.random.Generator
) -> tuple[Arrays, bool]:
    """Clip ``update`` (a client's arrays minus what it received) to L2 norm ``clip`` and add
    N(0, noise_std^2) to every coordinate, in float64; returns (private update, was within clip).

    For distributed DP under secure aggregation call it on each client before masking with
    ``noise_std = noise_multiplier * clip / sqrt(m)`` (m clients summed): the masked sum then
    carries exactly the noise central DP would add. ``ClientDP`` does this with ``noise_at: client``."""
    norm = update_norm(update)
    within = bool(norm <= clip)
    factor = 1.0 if within or not np.isfinite(norm) else clip / norm
    out = {}
    for k, v in update.items():
        u = v.astype(np.float64) * factor if np.isfinite(norm) else np.zeros(v.shape)
        if noise_std > 0:
            u = u + rng.normal(0.0, noise_std, v.shape)
        out[k] = u
    return out, within


class BoundOnly(Step):
    """The adaptive clip bound without server-side clipping (clients clipped and noised already)."""

    def init(self) -> dict[str, Any]:
        return {"bound": float(self.cfg.max_norm)}

    def apply(self, batch: Batch, state: dict[str, Any]) -> dict[str, Any]:
        bound = float(state.get("bound", self.cfg.max_norm))
        batch.clip_norm = bound
        batch.info["clip_norm"] = bound
        if not self.cfg.adaptive:
            return state
        within = float(sum(float(s.get(CLIP_BIT, 0.0)) for s in batch.scalars))
        return {"bound": adapt_bound(bound, within, len(batch.updates), self.cfg, batch.rng)}


def update_noise(cfg: PrivacyConfig, per_round: int) -> tuple[float, float]:
    """(std of the noise on the count of unclipped updates, noise multiplier of the updates): with
    adaptive clipping the count is noised too and the update noise raised so that both together
    cost ``noise_multiplier`` (Andrew et al. 2021); otherwise (0, noise_multiplier)."""
    z = cfg.noise_multiplier
    if cfg.clipping != "adaptive":
        return 0.0, z
    from fedmtl.privacy.accountant import adaptive_update_noise

    count = cfg.count_noise_std or max(per_round / 20.0, z)
    return count, (adaptive_update_noise(z, count) if z > 0 else z)


def aggregation_steps(
    cfg: PrivacyConfig,
    per_round: int,
    expected: float | None = None,
    expected_by_task: dict[str, float] | None = None,
) -> list[Step]:
    """Client-level DP's aggregation chain: clip, uniform mean, Gaussian noise (``noise_at:
    server``), or the adaptive bound and the uniform mean (``noise_at: client``: the clients clipped
    and noised already). Under Poisson sampling (``expected``: the expected clients per round, and
    per task) the mean divides each sum by that fixed count, so one client's share is public and the
    noise is calibrated to it (McMahan et al. 2018's fixed-denominator estimate). The clip step is
    always first (``ClientDP.clip_bound`` reads its state)."""
    count, noise = update_noise(cfg, per_round)
    clip = ClipStep(
        max_norm=cfg.clip_norm,
        adaptive=cfg.clipping == "adaptive",
        target_quantile=cfg.target_quantile,
        lr=cfg.clip_lr,
        count_noise_std=count if cfg.noise_multiplier > 0 else 0.0,
        expected_count=expected if expected is not None else per_round,
    )
    mean = Mean(MeanStep(weighting="uniform", expected=expected, expected_by_task=expected_by_task or {}))
    if cfg.noise_at == "server":
        return [Clip(clip), mean, GaussianNoise(GaussianNoiseStep(noise_multiplier=noise))]
    return [BoundOnly(clip), mean]


class ClientDP(ReplyWrapper):
    """Client-level DP around an algorithm whose server reduces its updates to a mean: the round
    runs the chain of ``aggregation_steps`` on that reduction; this keeps the accountant, sends the
    clip bound and clips (and noises) each client's update before it leaves the client."""

    def __init__(
        self,
        inner: Algorithm,
        cfg: PrivacyConfig,
        per_round: int,
        population: int,
        eval_every: int = 1,
        rounds: int = 0,
        noise_shares: int | None = None,
    ) -> None:
        super().__init__(inner)
        self.cfg = cfg
        self.per_round = per_round
        self.population = population
        #: the evaluation schedule (``eval.every``, ``train.rounds``): which rounds release metrics
        self.eval_every = eval_every
        self.rounds = rounds
        self.count_noise_std, self.update_noise = update_noise(cfg, per_round)
        #: ``noise_at: client``: the fewest clients whose noise shares reach the sum (each adds
        #: 1/noise_shares of the noise variance; more clients only add noise)
        self.noise_shares = noise_shares or per_round

    # --- accounting ---------------------------------------------------------------------------
    def epsilon_after(self, releases: int, evaluations: int = 0) -> float:
        """Epsilon after ``releases`` training rounds and ``evaluations`` DP evaluation rounds."""
        c = self.cfg
        k = len(c.eval_metrics) if c.eval_noise_multiplier is not None else 0
        return epsilon(
            c.noise_multiplier,
            releases,
            c.delta,
            self.per_round,
            self.population,
            c.sampling,
            c.accountant,
            eval_noise=c.eval_noise_multiplier or 0.0,
            eval_releases=k * evaluations,
        )

    # --- DP-aggregated evaluation -----------------------------------------------------------
    def _scheduled(self, rnd: int) -> bool:
        return rnd % self.eval_every == 0 or rnd == self.rounds

    def _evaluations(self, server: dict[str, Any]) -> int:
        """DP evaluation rounds released up to the server's last round: the scheduled ones, plus
        that round itself when the run stops behind it (the runtimes then evaluate it too)."""
        if self.cfg.eval_noise_multiplier is None:
            return 0
        rnd = int(server["dp"].get("round", 0))
        n = sum(self._scheduled(i) for i in range(1, rnd + 1))
        if rnd > 0 and not self._scheduled(rnd) and self.stop_reason(server, rnd + 1) is not None:
            n += 1
        return n

    def evaluates_clients(self) -> bool:
        return self.cfg.released_client_eval != "none"

    def release_eval(self, client_rows: list[dict[str, Any]], rnd: int) -> dict[str, Any] | None:
        """What an evaluation round releases under DP: per metric, the noisy mean of the clients'
        clipped values ('private'); nothing ('none'); the rows as they are ('exact', the simulation
        oracle the round rows label as such). The count of clients is public (the configured
        federation); under 'private' the rows themselves are never written."""
        c = self.cfg
        mode = c.released_client_eval
        if mode == "none":
            return {}
        if mode == "exact":
            return None
        rng = np.random.default_rng([self.ctx.seed, DP_EVAL_RNG, rnd])
        n = len(client_rows)
        out: dict[str, Any] = {"eval_private": True, "eval_clients": n}
        for metric in c.eval_metrics:
            total = sum(float(np.clip(r[metric], 0.0, c.eval_bound)) for r in client_rows if metric in r)
            noise = float(rng.normal(0.0, c.eval_noise_multiplier * c.eval_bound))
            if n:
                out[f"{metric}_mean"] = (total + noise) / n
        return out

    def clip_bound(self, server: dict[str, Any]) -> float:
        """The bound the round's chain holds now: its first step is the clip (``aggregation_steps``)."""
        state = (server.get(CHAIN_STATE) or {}).get("0") or {}
        return float(state.get("bound", self.cfg.clip_norm))

    # --- server side --------------------------------------------------------------------------
    def init_server(self) -> dict[str, Any]:
        return {**self.inner.init_server(), "dp": {"releases": 0}}

    def broadcast(self, server: dict[str, Any], cid: int) -> Message:
        msg = self.inner.broadcast(server, cid)
        return Message(arrays=msg.arrays, scalars={**msg.scalars, CLIP_KEY: self.clip_bound(server)})

    def reduction(self, server: dict[str, Any], replies: dict[int, Message], round: int) -> Reduce | None:
        """The inner reduction, every client weighted alike (DP-FedAvg's uniform mean: a client's
        sample count never leaves it). Each update on its own is not released."""
        request = self.inner.reduction(server, replies, round)
        if request is None:
            return None
        if request.keep_updates:
            raise ProtocolError(
                f"privacy.level = 'client': algorithm {self.name!r} asks for each client's update, and "
                "client-level DP releases only their noisy mean"
            )
        return replace(request, weights=dict.fromkeys(request.replies, 1.0))

    def server_update(self, server: dict[str, Any], aggregate: Aggregate, round: int) -> dict[str, Any]:
        """Counts the round's release: under Poisson sampling every round is one (an empty round
        releases the noise alone, ``Pipeline.releases_when_empty``); under fixed-size sampling a
        round with no accepted reply releases nothing."""
        releases = server["dp"]["releases"] + int(aggregate.released)
        new = self.inner.server_update(server, aggregate, round)
        return {**new, "dp": {"releases": releases, "round": round}}

    def round_info(self, server: dict[str, Any]) -> dict[str, Any]:
        releases = server["dp"]["releases"]
        evaluations = self._evaluations(server)
        info = {
            **self.inner.round_info(server),
            "epsilon": self.epsilon_after(releases, evaluations),
            "delta": self.cfg.delta,
            "dp_accounting": ACCOUNTING[self.cfg.sampling or "poisson"] + f" ({self.cfg.accountant})",
            "dp_releases": releases,
            "dp_clip": self.clip_bound(server),
            "dp_client_eval": CLIENT_EVAL[self.cfg.released_client_eval],
        }
        if self.cfg.eval_noise_multiplier is not None:
            info["dp_eval_releases"] = evaluations
        return info

    def stop_reason(self, server: dict[str, Any], round: int) -> str | None:
        reason = self.inner.stop_reason(server, round)
        if reason is not None or self.cfg.max_epsilon is None:
            return reason
        # the next round, and its evaluation whether scheduled or because the run stops behind it
        evaluations = 0
        if self.cfg.eval_noise_multiplier is not None:
            evaluations = sum(self._scheduled(i) for i in range(1, round + 1)) + (not self._scheduled(round))
        nxt = self.epsilon_after(server["dp"]["releases"] + 1, evaluations)
        if nxt > self.cfg.max_epsilon:
            return (
                f"privacy budget: round {round} would raise epsilon to {nxt:.4g} > privacy.max_epsilon = "
                f"{self.cfg.max_epsilon:g} (delta = {self.cfg.delta:g})"
            )
        return None

    # --- client side --------------------------------------------------------------------------
    def after_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork, reply: Message
    ) -> tuple[dict[str, Any], Message]:
        return state, self.privatize(reply, data, msg, work)

    def privatize(self, reply: Message, data: ClientData, msg: Message, work: ClientWork) -> Message:
        """The reply with its update clipped (and noised with ``noise_at: client``); of its scalars,
        only the clip bit leaves the client (with adaptive clipping, whose accounted count it
        enters): its loss, its sample and step counts are exact values of this one client."""
        clip = float(msg.scalars.get(CLIP_KEY, self.cfg.clip_norm))
        sent = msg.arrays
        update = {
            k: v.astype(np.float64) - sent[k].astype(np.float64) for k, v in reply.arrays.items() if k in sent
        }
        std = 0.0
        if self.cfg.noise_at == "client":
            std = self.update_noise * clip / np.sqrt(self.noise_shares)
        rng = np.random.default_rng([self.ctx.seed, DP_RNG, work.round, data.cid])
        private, within = privatize_update(update, clip, std, rng)
        arrays = dict(reply.arrays)
        for k, u in private.items():
            arrays[k] = (sent[k].astype(np.float64) + u).astype(reply.arrays[k].dtype)
        adaptive = self.cfg.clipping == "adaptive"
        return Message(arrays=arrays, scalars={CLIP_BIT: float(within)} if adaptive else {})


DP_SGD_RNG = 14


class SampleDP(AlgorithmWrapper):
    def __init__(self, inner: Algorithm, cfg: PrivacyConfig, data: FederatedData) -> None:
        super().__init__(inner)
        self.cfg = cfg
        spec = self.ctx.local
        self.sizes = {c.cid: c.n_train for c in data.clients}
        self.batch = {c: min(spec.batch_size, n) for c, n in self.sizes.items()}
        #: DP-SGD steps a client takes in a round with full work (every phase the algorithm trains)
        self.full_steps = {c.cid: inner.steps_per_round(c) for c in data.clients}

    def client_eps(self, cid: int, steps: int) -> float:
        c = self.cfg
        return epsilon(
            c.noise_multiplier, steps, c.delta, self.batch[cid], self.sizes[cid], "poisson", c.accountant
        )

    # --- server side --------------------------------------------------------------------------
    def init_server(self) -> dict[str, Any]:
        return {**self.inner.init_server(), "dp": {"steps": {}}}

    def server_update(self, server: dict[str, Any], aggregate: Aggregate, round: int) -> dict[str, Any]:
        """Each client's DP-SGD steps, as every train reply that reached the server reports them (a
        refused reply was trained and sent all the same; its own accountant agrees)."""
        steps = dict(server["dp"]["steps"])
        for cid, scalars in aggregate.reported.items():
            steps[cid] = steps.get(cid, 0) + int(scalars.get("steps", 0))
        return {**self.inner.server_update(server, aggregate, round), "dp": {"steps": steps}}

    def round_info(self, server: dict[str, Any]) -> dict[str, Any]:
        steps = server["dp"]["steps"]
        eps = [self.client_eps(c, s) for c, s in steps.items()]
        return {
            **self.inner.round_info(server),
            "epsilon": max(eps, default=0.0),
            "epsilon_mean": float(np.mean(eps)) if eps else 0.0,
            "delta": self.cfg.delta,
            "dp_accounting": ACCOUNTING["sample"] + f" ({self.cfg.accountant})",
        }

    def stop_reason(self, server: dict[str, Any], round: int) -> str | None:
        reason = self.inner.stop_reason(server, round)
        if reason is not None or self.cfg.max_epsilon is None:
            return reason
        steps = server["dp"]["steps"]
        worst = max(self.client_eps(c, steps.get(c, 0) + self.full_steps[c]) for c in self.sizes)
        if worst > self.cfg.max_epsilon:
            return (
                f"privacy budget: round {round} could raise a client's epsilon to {worst:.4g} > "
                f"privacy.max_epsilon = {self.cfg.max_epsilon:g} (delta = {self.cfg.delta:g})"
            )
        return None

    # --- client side --------------------------------------------------------------------------
    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> Generator[Train, Trained, tuple[dict[str, Any], Message]]:
        """The inner client step with every training step it declares done by DP-SGD."""
        noise = np.random.default_rng([self.ctx.seed, DP_SGD_RNG, work.round, data.cid])
        dp = DPSGD(clip=self.cfg.clip_norm, noise_multiplier=self.cfg.noise_multiplier, noise_rng=noise)
        change = lambda request: replace(request, dp=dp)  # noqa: E731
        return (yield from map_requests(self.inner.client_step(state, data, msg, work), change))


def chain(cfg: Config, data: FederatedData) -> list[Step] | None:
    """The aggregation chain client-level DP needs (it replaces the configured one), else None."""
    p = cfg.privacy
    if p.level != "client":
        return None
    pool = data.train_clients
    per_round = sample_size(cfg, len(pool))
    expected = by_task = None
    if cfg.clients.sampling == "poisson":
        q = per_round / len(pool)
        expected = q * len(pool)
        by_task = {}
        for cid in pool:
            task = data.clients[cid].task.name
            by_task[task] = by_task.get(task, 0.0) + q
    if cfg.aggregation:
        raise ConfigError(
            "config: privacy.level = 'client': sets the aggregation chain itself (clip, uniform mean, "
            "noise); leave aggregation empty"
        )
    try:
        return aggregation_steps(p, per_round, expected, by_task)
    except ValueError as exc:
        raise ConfigError(f"config: privacy.count_noise_std: {exc}") from None


def wrap(algo: Algorithm, cfg: Config, data: FederatedData) -> Algorithm:
    p = cfg.privacy
    if p.level == "sample":
        if not algo.batchable:
            raise ConfigError(
                f"config: privacy.level = 'sample': DP-SGD replaces the training steps an algorithm "
                f"declares; algorithm {algo.name!r} trains with its own solver"
            )
        if algo.needs_eval_data:
            raise ConfigError(
                f"config: privacy.level = 'sample': algorithm {algo.name!r} fine-tunes on each client's "
                "training records before every evaluation, outside the DP-SGD steps the accountant "
                "counts, and releases the result; use an algorithm that does not (e.g. fedper, ditto)"
            )
        return SampleDP(algo, p, data)
    chain(cfg, data)  # the round's chain, built here too: its config errors come first
    if algo.reduces != "mean":
        why = algo.reduces_why or f"its server combines replies as {algo.reduces!r}, not as a mean"
        raise ConfigError(
            f"config: privacy.level = 'client': clips and noises the model updates the server "
            f"aggregates, but algorithm {algo.name!r} cannot ({why})"
        )
    if algo.keeps_updates():
        raise ConfigError(
            f"config: privacy.level = 'client': algorithm {algo.name!r} (as configured) decides from each "
            "client's own update (discovered groups), which client-level DP does not release; use "
            "grouping: task"
        )
    if p.eval_noise_multiplier is not None and cfg.data.holdout_clients:
        raise ConfigError(
            "config: privacy.eval_noise_multiplier: DP-aggregated evaluation releases only the trained "
            "clients' metric means; set data.holdout_clients to 0"
        )
    if p.eval_noise_multiplier is not None and cfg.eval.clients is not None:
        raise ConfigError(
            "config: eval.clients: DP-aggregated evaluation releases the mean over every training client "
            "and is accounted so; leave eval.clients out"
        )
    if cfg.clients.sampling == "poisson" and not algo.mean_of_updates:
        raise ConfigError(
            f"config: clients.sampling = 'poisson': DP-FedAvg then divides each sum by its expected number "
            f"of clients, and algorithm {algo.name!r} needs more than that mean of the updates; use "
            "clients.sampling 'fixed'"
        )
    per_round = sample_size(cfg, len(data.train_clients))
    shares = None
    if p.noise_at == "client" and cfg.secagg.enabled:  # below the threshold the round aborts
        from fedmtl.features.secagg import threshold_for

        shares = threshold_for(cfg, per_round)
    return ClientDP(
        algo,
        p,
        per_round,
        len(data.train_clients),
        eval_every=cfg.eval.every,
        rounds=cfg.train.rounds,
        noise_shares=shares,
    )
