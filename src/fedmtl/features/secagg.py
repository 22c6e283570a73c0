"""Feature ``secagg:``: secure aggregation (config, checks, client and server behaviour; the
protocol and its cryptography are in ``fedmtl.secagg``). See docs/secagg.md.

**Masking** (``mode: masking``, Bonawitz et al. 2017): FedAvg-family training where the server only
learns the weighted sum. Client side (``client_step`` and the three ``client_actions``): the inner
algorithm trains as usual, then its update (client model - broadcast) is clipped, optionally
noised, quantised, weighted and kept in the client's own state; what leaves the client is its
public keys, then ciphertexts, then the masked vector, then shares. Server side: secure aggregation
is how the round carries out the algorithm's reduction (``SecAggReducer``). The train exchange's
replies are the advertised keys; stages 1-3 are further exchanges of the same round
(``fedmtl.secagg.channel.protocol_stages``), which the round delivers like any other (in-process in
the simulator, ``train.secagg_*`` messages on Flower); the reducer decodes the sum into the mean
update and hands the algorithm its aggregate, so its own ``server_update`` (server optimizer
included) runs unchanged. An aborted round (fewer than t clients left at some stage) releases
nothing: the global model stays as it was and the round row says why.

**CKKS** (``mode: ckks``, TenSEAL, optional extra ``he``): the clients share one CKKS secret key;
the server holds only the public context, receives ciphertexts, adds them, and asks a key-holding
client to decrypt the *sum* only. Unlike masking, dropouts need no recovery, but the round still
aborts below the threshold so a decrypted "sum" is never a single client's update. The key holder
is an in-process client role; distributing the secret key to Flower nodes is not implemented
(documented). CKKS is approximate (about 1e-7 relative error at a 2^40 scale), so updates are not
quantised; each client encrypts [w, w * update] in chunks of ``poly_degree / 2`` slots.

Only combinations where the server needs nothing but the weighted sum of client updates are
accepted; anything else is a one-line config error naming what clashes."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from fedmtl.algorithms.base import Algorithm, ClientAction, ClientWork, Exchange, Expected, Message
from fedmtl.algorithms.reduce import Aggregate, Reduce
from fedmtl.algorithms.wrapper import ReplyWrapper
from fedmtl.config_base import Strict
from fedmtl.data.federated import ClientData, FederatedData
from fedmtl.errors import ConfigError, ProtocolError
from fedmtl.runtime.reduction import Reduction
from fedmtl.runtime.round import sample_size
from fedmtl.runtime.seeds import derived_rng
from fedmtl.runtime.validation import reply_problem
from fedmtl.secagg.channel import ACTIONS, Traffic, protocol_stages
from fedmtl.secagg.layout import Layout
from fedmtl.secagg.protocol import (
    ADVERTISE,
    MASK,
    SHARE,
    STAGES,
    UNMASK,
    SecAggServer,
    client_advertise,
    client_masked_input,
    client_share_keys,
    client_unmask,
    refusal,
)
from fedmtl.secagg.quantize import RingCodec
from fedmtl.training.work import Train, Trained

if TYPE_CHECKING:
    from fedmtl.config import Config


class SecAggConfig(Strict):
    enabled: bool = False
    mode: Literal["masking", "ckks"] = Field(
        "masking", description="masking: Bonawitz et al. pairwise masks; ckks: TenSEAL homomorphic sum"
    )
    threshold: int | None = Field(
        None,
        ge=2,
        description="clients that must survive every stage (Shamir t); default: threshold_fraction",
    )
    threshold_fraction: float = Field(
        2 / 3, gt=0, le=1, description="t = ceil(fraction * clients sampled per round), at least 2"
    )
    neighbors: int = Field(
        0, ge=0, description="0: every client masks with every other; k (even): SecAgg+'s k-regular graph"
    )
    bits: int = Field(16, ge=2, le=32, description="fixed-point levels per coordinate: 2^(bits-1) - 1")
    clip: float = Field(1.0, gt=0, description="update coordinates (client model - global) clipped to +-clip")
    rounding: Literal["stochastic", "nearest"] = "stochastic"
    weighting: Literal["samples", "uniform"] = Field(
        "samples", description="samples: weight = num_examples inside the masked vector (FedAvg)"
    )
    stage_drop_prob: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="a simulated fault: the server skips each client before each protocol stage with this "
        "probability (any runtime; keep 0 on a real federation)",
    )
    send_metrics: bool = Field(True, description="clients still report train loss/steps in the clear")
    ckks_poly_degree: Literal[8192, 16384] = 8192
    ckks_scale_bits: int = Field(40, ge=20, le=60)

    @field_validator("neighbors")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("must be even (k/2 neighbours on either side of a ring), or 0 for all pairs")
        return v


#: Purposes of derived random streams (the simulator uses 1-3).
ROUNDING, STAGE_DROP, GRAPH = 101, 103, 104
#: Client scalars that may travel in the clear next to the keys (run bookkeeping, not the update).
METRICS = ("train_loss", "steps", "samples", "personal_loss")


def share_holders(cfg: Config, sampled: int) -> int:
    """How many clients hold shares of one client's secrets (itself included)."""
    k = cfg.secagg.neighbors
    return sampled if k == 0 or k >= sampled - 1 else k + 1


def threshold_for(cfg: Config, sampled: int) -> int:
    """Shamir's t: of the sampled clients, or of one neighbourhood with ``neighbors`` (SecAgg+)."""
    sa = cfg.secagg
    n = share_holders(cfg, sampled)
    return sa.threshold if sa.threshold is not None else max(2, math.ceil(sa.threshold_fraction * n))


class SecureUpdates(ReplyWrapper):
    """The client side shared by both modes: encoding updates; what a train reply then is."""

    def __init__(self, inner: Algorithm, cfg: Config, data: FederatedData) -> None:
        super().__init__(inner)
        self.sa = cfg.secagg
        self.seed = cfg.seed
        self.data = data
        #: metrics in the clear are exact values of one client: none under client-level DP
        self.send_metrics = self.sa.send_metrics and not (
            cfg.privacy.enabled and cfg.privacy.level == "client"
        )
        self.sampled = sample_size(cfg, len(data.train_clients))
        self.threshold = threshold_for(cfg, self.sampled)
        train = [data.clients[c] for c in data.train_clients]
        total = sum(c.n_train for c in train) if self.sa.weighting == "samples" else len(train)
        self.codec = RingCodec.for_weights(
            self.sa.bits, self.sa.clip, total, self.sa.rounding == "stochastic"
        )

    def layout(self, msg: Message) -> Layout:
        return Layout.of(msg.arrays)

    def weight_of(self, reply: Message) -> int:
        return int(reply.scalars["num_examples"]) if self.sa.weighting == "samples" else 1

    def client_delta(self, cid: int, msg: Message, reply: Message, work: ClientWork) -> np.ndarray:
        """The update that gets protected: client model - broadcast. Differential privacy's clipping
        and noise (``privacy.noise_at: client``) are already in it: that wrapper sits inside this one."""
        return self.layout(msg).delta(reply.arrays, msg.arrays, f"client {cid}")

    def clear_scalars(self, reply: Message) -> dict[str, Any]:
        if not self.send_metrics:
            return {}
        return {k: reply.scalars[k] for k in METRICS if k in reply.scalars}

    def expected_reply(self, server: dict[str, Any], cid: int, sent: Message) -> Expected | None:
        """A train reply is protocol material (public keys, ciphertexts), not the model's arrays;
        the protocol checks it. The round still refuses non-numeric and non-finite arrays."""
        return None


class SecAggWrapper(SecureUpdates):
    """Pairwise-masking secure aggregation around a FedAvg-family algorithm (see module doc)."""

    def __init__(self, inner: Algorithm, cfg: Config, data: FederatedData) -> None:
        super().__init__(inner, cfg, data)
        #: Tests: clients forced to drop just before a stage, e.g. {"masked_input": {3}}.
        self.force_drop: dict[str, set[int]] = {}

    def client_actions(self) -> dict[str, ClientAction]:
        return {
            **self.inner.client_actions(),
            ACTIONS[SHARE]: self.client_share_keys,
            ACTIONS[MASK]: self.client_masked_input,
            ACTIONS[UNMASK]: self.client_unmask,
        }

    # --- client side ---------------------------------------------------------------------------
    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> Generator[Train, Trained, tuple[dict[str, Any], Message]]:
        # a session left by a round this client dropped out of never serves another round
        return (yield from super().client_step(_ended(state), data, msg, work))

    def after_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork, reply: Message
    ) -> tuple[dict[str, Any], Message]:
        cid = data.cid
        if reply_problem(reply) is not None:  # diverged: the runtime rejects and names this client
            return state, Message(arrays={"update": np.array([np.nan], np.float32)})
        delta = self.client_delta(cid, msg, reply, work)
        rng = derived_rng(self.seed, ROUNDING, work.round, cid)
        x, clipped = self.codec.encode(delta, self.weight_of(reply), rng)
        session, adv = client_advertise(cid, work.round, x)
        adv.scalars.update(self.clear_scalars(reply))
        if self.send_metrics:  # how many coordinates hit the clip range: tuning feedback
            adv.scalars["secagg_clipped"] = clipped
        return {**state, "secagg": session}, adv

    def _session(self, state: dict[str, Any], cid: int) -> dict[str, Any]:
        if "secagg" not in state:
            raise ProtocolError(f"secagg: client {cid} has no protocol session (it did not train this round)")
        return state["secagg"]

    def client_share_keys(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> tuple[dict[str, Any], Message]:
        try:
            session, reply = client_share_keys(self._session(state, data.cid), msg)
        except ProtocolError as exc:  # refuse (counts as a dropout) rather than crash the node
            return _ended(state), refusal(exc)
        return {**state, "secagg": session}, reply

    def client_masked_input(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> tuple[dict[str, Any], Message]:
        try:
            session, reply = client_masked_input(self._session(state, data.cid), msg, self.codec)
        except ProtocolError as exc:
            return _ended(state), refusal(exc)
        return {**state, "secagg": session}, reply

    def client_unmask(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> tuple[dict[str, Any], Message]:
        try:
            reply = client_unmask(self._session(state, data.cid), msg)
        except ProtocolError as exc:
            reply = refusal(exc)
        return _ended(state), reply


class SecAggReducer:
    """Carries out a reduction by pairwise-masking secure aggregation (see module doc): the
    server learns the weighted mean of the updates and nothing of any one of them."""

    guarantees = "secure aggregation"

    def __init__(self, clients: SecAggWrapper) -> None:
        self.sa = clients.sa
        self.seed = clients.seed
        self.codec = clients.codec
        self.threshold = clients.threshold
        self.sampled = clients.sampled
        #: Tests: clients forced to drop just before a stage, e.g. {"masked_input": {3}}.
        self.force_drop: dict[str, set[int]] = {}

    def _drops(self, stage: str, cid: int, rnd: int) -> bool:
        """Whether ``cid`` drops out just before ``stage`` (``stage_drop_prob``, a simulated fault)."""
        if cid in self.force_drop.get(stage, set()):
            return True
        p = self.sa.stage_drop_prob
        return p > 0 and derived_rng(self.seed, STAGE_DROP, rnd, cid, STAGES.index(stage)).random() < p

    def _stages(
        self, srv: SecAggServer, advertised: dict[int, Message], traffic: Traffic
    ) -> Generator[Exchange, dict[int, Message], np.ndarray]:
        """``protocol_stages`` with the simulated stage dropouts and per-stage byte counts."""
        stages = protocol_stages(srv, advertised, self.sampled)
        stage_of = {a: s for s, a in ACTIONS.items()}
        try:
            exchange = next(stages)
            while True:
                stage = stage_of[exchange.action]
                msgs = {c: m for c, m in exchange.messages.items() if not self._drops(stage, c, srv.round)}
                replies = yield Exchange(exchange.action, msgs)
                for cid, m in msgs.items():
                    traffic.add(stage, cid, m, replies.get(cid))
                exchange = stages.send(replies)
        except StopIteration as stop:
            return stop.value

    def reduce(self, request: Reduce, state: dict[str, Any] | None, round: int) -> Reduction:
        """The train replies are the clients' advertised keys; stages 1-3 are further exchanges of
        the round; the decoded sum is the aggregate (nothing, if the round aborts)."""
        replies = request.replies
        t0 = time.perf_counter()
        layout = Layout.of(request.reference)
        length = layout.size + 1
        graph_seed = int(derived_rng(self.seed, GRAPH, round).integers(2**31))
        srv = SecAggServer(self.codec, length, self.threshold, round, self.sa.neighbors, graph_seed)
        clipped = sum(int(r.scalars.get("secagg_clipped", 0)) for r in replies.values())
        info: dict[str, Any] = {
            "secagg_threshold": self.threshold,
            "secagg_ring_bytes": self.codec.ring_bytes,
        }
        traffic = Traffic()
        out = Aggregate(replies={c: Message(scalars=r.scalars) for c, r in replies.items()})
        try:
            total = yield from self._stages(srv, replies, traffic)
            mean, weight = self.codec.decode_sum(total)
            out.params = layout.apply(request.reference, mean)
            out.weight = float(weight)
            out.released = True
            info["secagg_status"] = "ok"
        except ProtocolError as exc:
            info.update(secagg_status="aborted", secagg_error=str(exc))
            print(f"fedmtl: {exc}", file=sys.stderr)
        summary = srv.summary()
        out.accepted = sorted(srv.u2) if out.released else []  # whose masked inputs the sum holds
        up, down = traffic.totals()  # beyond the train exchange, which the round counts
        for cid, r in replies.items():
            traffic.add(ADVERTISE, cid, None, r)
        info.update(
            secagg_survivors=summary["survivors"],
            secagg_recovered=summary["recovered"],
            secagg_dropped=summary["dropped"],
            secagg_clipped_fraction=clipped / max(1, len(replies) * (length - 1)),
            secagg_server_seconds=sum(summary["server_seconds"].values()),
            secagg_round_seconds=time.perf_counter() - t0,
            secagg_bytes_up=up,
            secagg_bytes_down=down,
            secagg_stages=traffic.summary(),
        )
        out.info = info
        return out, state


def _ended(state: dict[str, Any]) -> dict[str, Any]:
    """The client state once its protocol session is over (its secrets die with the round)."""
    return {k: v for k, v in state.items() if k != "secagg"}


# ------------------------------------------------------------------------------------------ CKKS
def tenseal() -> Any:
    try:
        import tenseal as ts
    except ImportError:
        raise ConfigError(
            "config: secagg.mode = 'ckks': TenSEAL is not installed; pip install 'fedmtl[he]'"
        ) from None
    return ts


class CKKSWrapper(SecureUpdates):
    def __init__(self, inner: Algorithm, cfg: Config, data: FederatedData) -> None:
        super().__init__(inner, cfg, data)
        ts = tenseal()
        self.ts = ts
        n = self.sa.ckks_poly_degree
        scale = self.sa.ckks_scale_bits
        # Client-side key material (in-process key holder). 60-bit outer primes carry the scale.
        self._secret = ts.context(
            ts.SCHEME_TYPE.CKKS, poly_modulus_degree=n, coeff_mod_bit_sizes=[60, scale, 60]
        )
        self._secret.global_scale = 2.0**scale
        public = self._secret.copy()
        public.make_context_public()
        #: What the server holds: the serialised public context (no secret key).
        self.public_context = public.serialize()
        self._server_ctx = ts.context_from(self.public_context)
        self.slots = n // 2

    # --- client side ---------------------------------------------------------------------------
    def after_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork, reply: Message
    ) -> tuple[dict[str, Any], Message]:
        if reply_problem(reply) is not None:
            return state, Message(arrays={"update": np.array([np.nan], np.float32)})
        t0 = time.perf_counter()
        w = self.weight_of(reply)
        vec = np.concatenate([[float(w)], w * self.client_delta(data.cid, msg, reply, work)])
        arrays = {}
        for i in range(0, vec.size, self.slots):
            ct = self.ts.ckks_vector(self._secret, vec[i : i + self.slots]).serialize()
            arrays[f"ct{i // self.slots:05d}"] = np.frombuffer(ct, dtype=np.uint8).copy()
        out = Message(arrays=arrays, scalars=self.clear_scalars(reply))
        out.scalars["secagg_encrypt_seconds"] = time.perf_counter() - t0
        return state, out

    def decrypt_sum(self, msg: Message) -> Message:
        """The key holder's one job: decrypt an aggregated ciphertext (never an individual one)."""
        parts = [
            self.ts.ckks_vector_from(self._secret, msg.arrays[k].tobytes()).decrypt()
            for k in sorted(msg.arrays)
        ]
        return Message(arrays={"sum": np.concatenate([np.asarray(p, np.float64) for p in parts])})


class CKKSReducer:
    """Carries out a reduction with CKKS: the server adds the clients' ciphertexts and has the key
    holder decrypt the sum only."""

    guarantees = "secure aggregation"

    def __init__(self, clients: CKKSWrapper) -> None:
        self.clients = clients  # the in-process key holder (decrypt_sum) and the public context
        self.threshold = clients.threshold
        self.sampled = clients.sampled

    def reduce(self, request: Reduce, state: dict[str, Any] | None, round: int) -> Reduction:
        replies = request.replies
        ts = self.clients.ts
        server_ctx = self.clients._server_ctx
        t0 = time.perf_counter()
        info: dict[str, Any] = {"secagg_mode": "ckks", "secagg_threshold": self.threshold}
        out = Aggregate(replies={c: Message(scalars=r.scalars) for c, r in replies.items()})
        try:
            if len(replies) < self.threshold:
                raise ProtocolError(
                    f"secagg round {round}: only {len(replies)} of {self.sampled} clients sent ciphertexts, "
                    f"below the threshold t={self.threshold}; round aborted"
                )
            keys = sorted(next(iter(replies.values())).arrays)
            total: dict[str, Any] = {}
            for cid, r in sorted(replies.items()):
                if sorted(r.arrays) != keys:
                    raise ProtocolError(f"secagg: client {cid}: ciphertext chunks {sorted(r.arrays)} differ")
                for k in keys:
                    ct = ts.ckks_vector_from(server_ctx, r.arrays[k].tobytes())
                    total[k] = ct if k not in total else total[k] + ct
            agg = Message(
                arrays={k: np.frombuffer(v.serialize(), dtype=np.uint8).copy() for k, v in total.items()}
            )
            server_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            plain = self.clients.decrypt_sum(agg).arrays["sum"]
            decrypt_seconds = time.perf_counter() - t1
            weight = float(plain[0])
            layout = Layout.of(request.reference)
            out.params = layout.apply(request.reference, plain[1 : 1 + layout.size] / weight)
            out.weight = float(round_weight(weight))
            out.accepted = sorted(replies)
            out.released = True
            per_client = float(np.mean([r.nbytes for r in replies.values()]))
            info.update(
                secagg_status="ok",
                secagg_survivors=len(replies),
                secagg_bytes_up_per_client=per_client,
                secagg_bytes_sum=agg.nbytes,
                secagg_server_seconds=server_seconds,
                secagg_decrypt_seconds=decrypt_seconds,
                secagg_encrypt_seconds=float(
                    np.mean([float(r.scalars.get("secagg_encrypt_seconds", 0.0)) for r in replies.values()])
                ),
                secagg_bytes_down=agg.nbytes,  # the sum ciphertext to the key holder
            )
        except ProtocolError as exc:
            info.update(secagg_status="aborted", secagg_error=str(exc))
            print(f"fedmtl: {exc}", file=sys.stderr)
        info["secagg_round_seconds"] = time.perf_counter() - t0
        out.info = info
        return out, state
        yield  # a generator like every reduction: CKKS needs no exchange beyond the train one


def round_weight(w: float) -> int:
    """The decrypted total weight (an integer, up to CKKS's tiny error)."""
    return max(1, int(np.rint(w)))


#: Aggregation steps that are linear in the updates, so a masked sum can stand in for them.
LINEAR_STEPS = {"mean", "weighted_mean"}


def unsupported(algo: Algorithm, cfg: Config) -> str | None:
    """Why secure aggregation cannot wrap this algorithm/config (None when it can)."""
    name = algo.name
    if not algo.has_global_model:
        return f"algorithm {name!r} has no global model to aggregate"
    if algo.reduces != "mean" or not algo.mean_of_updates or algo.keeps_updates():
        return (
            f"algorithm {name!r} needs more than the weighted mean of client updates, which is all "
            "secure aggregation reveals"
        )
    if algo.ctx.multi_task:
        return (
            "multi-task federations average each head over its own clients; "
            "secure aggregation sums one vector"
        )
    why = _privacy_clash(cfg)
    if why is not None:
        return why
    for step in cfg.aggregation:
        weighting = getattr(step, "weighting", None)  # only the mean-like steps have one
        if step.name in LINEAR_STEPS and weighting not in (None, cfg.secagg.weighting):
            return (
                f"aggregation step {step.name!r} weights by {weighting!r} but secagg.weighting is "
                f"{cfg.secagg.weighting!r}; make them equal"
            )
        if step.name not in LINEAR_STEPS:
            return (
                f"aggregation step {step.name!r} needs individual client updates, which secure aggregation "
                f"hides; allowed with secagg: {', '.join(sorted(LINEAR_STEPS))}"
            )
    return None


def _privacy_clash(cfg: Config) -> str | None:
    """Differential privacy works with secure aggregation only when nothing of it needs one
    client's update on the server: clients clip and noise (DP-FedAvg with ``noise_at: client``)."""
    p = cfg.privacy
    if not p.enabled:
        return None
    if p.level != "client":
        return (
            f"privacy.level = {p.level!r} accounts each client's steps from its own reply, which secure "
            "aggregation replaces by one aggregate; use privacy.level: client with noise_at: client"
        )
    if p.noise_at != "client":
        return (
            "privacy.noise_at = 'server' clips and noises individual updates on the server, which secure "
            "aggregation hides; use privacy.noise_at: client (each client adds its share of the noise)"
        )
    if p.clipping != "fixed":
        return (
            f"privacy.clipping = {p.clipping!r} needs each client's clip bit on the server; "
            "use privacy.clipping: fixed"
        )
    if cfg.secagg.weighting != "uniform":
        return (
            f"secagg.weighting = {cfg.secagg.weighting!r}, but DP-FedAvg averages clients uniformly; "
            "set secagg.weighting: uniform"
        )
    return None


def wrap(algo: Algorithm, cfg: Config, data: FederatedData) -> Algorithm:
    sa = cfg.secagg
    why = unsupported(algo, cfg)
    if why is not None:
        raise ConfigError(f"config: secagg.enabled = True: {why}")
    sampled = sample_size(cfg, len(data.train_clients))
    t = threshold_for(cfg, sampled)
    holders = share_holders(cfg, sampled)
    if t > holders:
        who = (
            f"the {sampled} clients sampled per round"
            if holders == sampled
            else f"the {holders} share holders of a neighbourhood (secagg.neighbors = {sa.neighbors})"
        )
        raise ConfigError(f"config: secagg.threshold = {t}: more than {who}; allowed: 2..{holders}")
    if sa.mode == "ckks" and sa.neighbors:
        raise ConfigError(
            f"config: secagg.neighbors = {sa.neighbors}: a masking option; mode 'ckks' has no masks"
        )
    if sa.mode == "ckks":
        return CKKSWrapper(algo, cfg, data)
    return SecAggWrapper(algo, cfg, data)


def reducer(algo: Algorithm, cfg: Config, data: FederatedData) -> SecAggReducer | CKKSReducer:
    """The round's reducer: the protocol's server side, around the client side ``wrap`` built."""
    layer: Algorithm = algo
    while not isinstance(layer, SecureUpdates):
        layer = layer.inner  # type: ignore[attr-defined]
    return CKKSReducer(layer) if isinstance(layer, CKKSWrapper) else SecAggReducer(layer)  # type: ignore[arg-type]
