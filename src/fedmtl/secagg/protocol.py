"""Pairwise-masking secure aggregation (Bonawitz et al., CCS 2017), semi-honest variant.

Four stages; every arrow is a ``Message`` (named numpy arrays + scalars), so the same code runs
in-process and over Flower's custom message types:

0. **advertise keys**: each client makes two fresh X25519 key pairs (``c`` encrypts shares,
   ``s`` agrees pairwise mask seeds) and sends the public halves. U1 = the senders.
1. **share keys**: each client draws a self-mask seed ``b``, Shamir-shares ``b`` and its ``s``
   private key t-out-of-|U1| (one share per peer, at the point cid + 1), and sends each peer its
   shares AES-GCM-encrypted under a key agreed from the ``c`` keys; the server only routes
   ciphertexts. U2 = the senders.
2. **masked input**: client u sends y_u = x_u + PRG(b_u) + sum_{v in U2, v != u} +-PRG(s_uv)
   (plus when u < v, minus otherwise) in Z_R; pairwise masks cancel in the sum. U3 = the senders.
3. **unmasking**: the server names U3; each client decrypts what it holds and returns, for every
   peer u of U2, the share of b_u if u is in U3 and the share of u's ``s`` key otherwise - never
   both for one peer, which is what keeps a survivor's input hidden. With shares from at least t
   clients (U4) the server removes the self masks of U3 and the pairwise masks that U3 clients
   shared with the dropped clients (U2 \\ U3), and is left with sum_{u in U3} x_u.

Any stage reached by fewer than t clients aborts the round with one ``ProtocolError`` line.
``SecAggServer`` is the whole server side: its methods take and return ``Message``s and never see a
client object, a key it was not sent, or an unmasked input. Not implemented (documented): the
consistency-check round and signatures of the actively secure variant, and SecAgg+'s sparse graph.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedmtl.algorithms.base import Message
from fedmtl.errors import ProtocolError
from fedmtl.secagg.prg import (
    KEY_BYTES,
    SEED_BYTES,
    MaskStream,
    agree,
    new_keypair,
    new_seed,
    private_key,
)
from fedmtl.secagg.quantize import RingCodec
from fedmtl.secagg.shamir import Shamir, bytes_to_elements, elements_to_bytes, num_elements

#: Stage names as they appear in messages, Flower message types and the round row.
ADVERTISE, SHARE, MASK, UNMASK = "advertise", "share_keys", "masked_input", "unmasking"
STAGES = (ADVERTISE, SHARE, MASK, UNMASK)

_MB = num_elements(SEED_BYTES)  # field elements per share of b
_MS = num_elements(KEY_BYTES)  # field elements per share of the s private key
_PLAIN = 16 + 4 * (_MB + _MS)  # sender id, receiver id, both shares as uint32
CT_BYTES = 12 + _PLAIN + 16  # nonce + plaintext + GCM tag

_shamir = Shamir()
#: Scalar of a client's reply when it refuses a stage (a check failed): it then counts as dropped.
REFUSED = "secagg_refused"


def refusal(exc: ProtocolError) -> Message:
    """What a client sends instead of raising: on Flower an exception would end the whole run."""
    return Message(scalars={REFUSED: str(exc)})


def neighbours(cids: list[int], k: int, seed: int) -> dict[int, set[int]]:
    """Each client's mask/share partners. ``k == 0`` (or k >= n - 1): everyone (Bonawitz et al.).
    Otherwise SecAgg+ (Bell et al. 2020): clients sit on a ring in an order drawn from a public
    seed, and each pairs with the k/2 nearest on either side (a k-regular Harary graph)."""
    n = len(cids)
    if k <= 0 or k >= n - 1:
        return {c: {v for v in cids if v != c} for c in cids}
    order = [cids[i] for i in np.random.default_rng(seed).permutation(n)]
    pos = {c: i for i, c in enumerate(order)}
    half = k // 2
    return {c: {order[(pos[c] + d) % n] for d in range(-half, half + 1) if d != 0} for c in cids}


def _u8(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.uint8).copy()


def _bytes(a: Any) -> bytes:
    return np.asarray(a, dtype=np.uint8).tobytes()


def _require(msg: Message, key: str, who: str, dtype: Any, shape: tuple[int | None, ...]) -> np.ndarray:
    """The array ``key`` of a message, checked, or a one-line ProtocolError naming who sent it."""
    if key not in msg.arrays:
        raise ProtocolError(f"secagg: {who}: message has no {key!r} array")
    a = np.asarray(msg.arrays[key])
    ok = a.dtype == np.dtype(dtype) and a.ndim == len(shape)
    ok = ok and all(s is None or s == d for s, d in zip(shape, a.shape, strict=False))
    if not ok:
        want = "x".join("*" if s is None else str(s) for s in shape)
        raise ProtocolError(
            f"secagg: {who}: {key!r} must be {np.dtype(dtype)} [{want}], got {a.dtype} {list(a.shape)}"
        )
    return a


# ================================================================================== client side
def client_advertise(cid: int, round: int, x: np.ndarray) -> tuple[dict[str, Any], Message]:
    """Stage 0: fresh key pairs; the session (client state) keeps the private halves and the input."""
    c_sk, c_pk = new_keypair()
    s_sk, s_pk = new_keypair()
    session = {"cid": int(cid), "round": int(round), "c_sk": _u8(c_sk), "s_sk": _u8(s_sk), "x": x}
    return session, Message(arrays={"c_pk": _u8(c_pk), "s_pk": _u8(s_pk)})


def _share_key(session: dict[str, Any], peer_c_pk: bytes, sk: Any = None) -> bytes:
    sk = private_key(_bytes(session["c_sk"])) if sk is None else sk
    return agree(sk, peer_c_pk, b"share", int(session["round"]), length=16)


def client_share_keys(session: dict[str, Any], msg: Message) -> tuple[dict[str, Any], Message]:
    """Stage 1: Shamir-share b and the s private key among U1; one ciphertext per peer."""
    me = int(session["cid"])
    who = f"client {me} ({SHARE})"
    cids = _require(msg, "cids", who, np.int64, (None,))
    c_pk = _require(msg, "c_pk", who, np.uint8, (len(cids), KEY_BYTES))
    s_pk = _require(msg, "s_pk", who, np.uint8, (len(cids), KEY_BYTES))
    t = int(msg.scalars.get("threshold", 0))
    if len(np.unique(cids)) != len(cids) or me not in set(cids.tolist()):
        raise ProtocolError(f"secagg: {who}: the key list must hold distinct clients including this one")
    mine = neighbours(
        cids.tolist(), int(msg.scalars.get("neighbors", 0)), int(msg.scalars.get("graph_seed", 0))
    )[me]
    if not 2 <= t <= len(mine) + 1:
        raise ProtocolError(f"secagg: {who}: threshold {t} is outside 2..{len(mine) + 1} (its share holders)")
    if len({bytes(r) for r in s_pk} | {bytes(r) for r in c_pk}) != 2 * len(cids):
        raise ProtocolError(f"secagg: {who}: the advertised public keys are not all distinct")
    b = new_seed()
    holders = np.asarray(sorted(mine | {me}), dtype=np.int64)
    xs = holders + 1
    both = _shamir.split(
        np.concatenate([bytes_to_elements(b), bytes_to_elements(_bytes(session["s_sk"]))]), xs, t
    )
    sh_b, sh_s = both[:, :_MB], both[:, _MB:]
    to, cts = [], []
    own_b = None
    c_sk = private_key(_bytes(session["c_sk"]))
    index = {int(c): i for i, c in enumerate(cids.tolist())}
    for i, v in enumerate(holders.tolist()):
        if v == me:
            own_b = sh_b[i].copy()  # revealed at unmasking: this client's own b is removed anyway
            continue
        plain = (
            np.array([me, v], dtype="<i8").tobytes()
            + sh_b[i].astype("<u4").tobytes()
            + sh_s[i].astype("<u4").tobytes()
        )
        nonce = os.urandom(12)
        ct = nonce + AESGCM(_share_key(session, _bytes(c_pk[index[v]]), c_sk)).encrypt(nonce, plain, None)
        to.append(v)
        cts.append(np.frombuffer(ct, dtype=np.uint8))
    session = {
        **session,
        "b": _u8(b),
        "own_b_share": own_b,
        "t": t,
        "peers": cids.copy(),
        "c_pk": c_pk.copy(),
        "s_pk": s_pk.copy(),
    }
    ct_arr = np.stack(cts) if cts else np.zeros((0, CT_BYTES), np.uint8)
    return session, Message(arrays={"to": np.asarray(to, dtype=np.int64), "ct": ct_arr})


def _peer_index(session: dict[str, Any]) -> dict[int, int]:
    return {int(c): i for i, c in enumerate(np.asarray(session["peers"]).tolist())}


def client_masked_input(
    session: dict[str, Any], msg: Message, codec: RingCodec
) -> tuple[dict[str, Any], Message]:
    """Stage 2: y = x + PRG(b) + sum of signed pairwise masks with the peers still in U2."""
    me, rnd = int(session["cid"]), int(session["round"])
    who = f"client {me} ({MASK})"
    frm = _require(msg, "from", who, np.int64, (None,))
    cts = _require(msg, "ct", who, np.uint8, (len(frm), CT_BYTES))
    index = _peer_index(session)
    if me in set(frm.tolist()) or not set(frm.tolist()) <= set(index) or len(np.unique(frm)) != len(frm):
        raise ProtocolError(f"secagg: {who}: U2 must be distinct peers of U1 other than this client")
    if len(frm) + 1 < int(session["t"]):
        raise ProtocolError(
            f"secagg: {who}: only {len(frm) + 1} clients in U2, below the threshold {session['t']}"
        )
    y = np.array(session["x"], dtype=np.uint64)  # a copy: the input itself stays untouched
    prg = MaskStream(y.size)
    prg.apply(y, _bytes(session["b"]), +1)
    s_sk = private_key(_bytes(session["s_sk"]))
    for v in frm.tolist():
        prg.apply(y, agree(s_sk, _bytes(session["s_pk"][index[v]]), b"mask", rnd), +1 if me < v else -1)
    session = {**session, "u2": frm.copy(), "inbox": cts.copy()}
    del session["x"]  # the raw input is no longer needed on the client either
    return session, Message(arrays={"y": codec.to_wire(codec.reduce(y))})


def client_unmask(session: dict[str, Any], msg: Message) -> Message:
    """Stage 3: for each peer of U2, the share of b (it survived) or of its s key (it dropped)."""
    me = int(session["cid"])
    who = f"client {me} ({UNMASK})"
    alive = set(_require(msg, "alive", who, np.int64, (None,)).tolist())
    u2 = np.asarray(session["u2"]).tolist()
    if me not in alive:
        raise ProtocolError(f"secagg: {who}: U3 must include this client")
    local = alive & (set(u2) | {me})  # the survivors this client shares with (all of U3 without a graph)
    if len(local) < int(session["t"]):
        raise ProtocolError(
            f"secagg: {who}: only {len(local)} of its share holders in U3, below the threshold {session['t']}"
        )
    index = _peer_index(session)
    b_of, b_sh, s_of, s_sh = [me], [np.asarray(session["own_b_share"])], [], []
    c_sk = private_key(_bytes(session["c_sk"]))
    for row, u in zip(np.asarray(session["inbox"]), u2, strict=True):
        raw = row.tobytes()
        key = _share_key(session, _bytes(session["c_pk"][index[u]]), c_sk)
        try:
            plain = AESGCM(key).decrypt(raw[:12], raw[12:], None)
        except InvalidTag:
            raise ProtocolError(f"secagg: {who}: the share from client {u} does not authenticate") from None
        ids = np.frombuffer(plain[:16], dtype="<i8")
        if ids.tolist() != [u, me]:
            raise ProtocolError(f"secagg: {who}: the share from client {u} names clients {ids.tolist()}")
        shares = np.frombuffer(plain[16:], dtype="<u4").astype(np.int64)
        if u in alive:
            b_of.append(u)
            b_sh.append(shares[:_MB])
        else:
            s_of.append(u)
            s_sh.append(shares[_MB:])
    return Message(
        arrays={
            "b_of": np.asarray(b_of, dtype=np.int64),
            "b_share": np.asarray(b_sh, dtype=np.int64).reshape(-1, _MB),
            "s_of": np.asarray(s_of, dtype=np.int64),
            "s_share": np.asarray(s_sh, dtype=np.int64).reshape(-1, _MS),
        }
    )


# ================================================================================== server side
@dataclass
class StageLog:
    clients: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)
    server_seconds: float = 0.0


class SecAggServer:
    """The server's side of one round. It holds public keys, ciphertexts it cannot read, masked
    inputs and, at the end, their sum; every input is a client ``Message``."""

    def __init__(
        self,
        codec: RingCodec,
        length: int,
        threshold: int,
        round: int,
        neighbors: int = 0,
        graph_seed: int = 0,
    ) -> None:
        if threshold < 2:
            raise ProtocolError(f"secagg: threshold {threshold} must be at least 2")
        self.codec = codec
        self.length = length  # ring elements per input (weight coordinate included)
        self.t = threshold
        self.round = round
        self.k = neighbors  # 0: every pair of clients; else SecAgg+'s k-regular graph
        self.graph_seed = graph_seed
        self.nbrs: dict[int, set[int]] = {}
        self.log: dict[str, StageLog] = {s: StageLog() for s in STAGES}
        self.u1: list[int] = []
        self.c_pk: dict[int, bytes] = {}
        self.s_pk: dict[int, bytes] = {}
        self.routed: dict[int, tuple[list[int], list[np.ndarray]]] = {}
        self.u2: list[int] = []
        self.u3: list[int] = []
        self.masked_sum: np.ndarray | None = None

    def _accept(
        self, stage: str, expected: list[int], replies: dict[int, Message], check: Any, of: int | None = None
    ) -> list[int]:
        """Clients of ``expected`` whose reply passes ``check``; the others count as dropped."""
        log = self.log[stage]
        for cid in expected:
            if cid not in replies or REFUSED in replies[cid].scalars:
                log.dropped.append(cid)
                log.reasons[cid] = str(replies[cid].scalars[REFUSED]) if cid in replies else "no reply"
                continue
            try:
                check(cid, replies[cid])
            except ProtocolError as exc:
                log.dropped.append(cid)
                log.reasons[cid] = str(exc)
                continue
            log.clients.append(cid)
        if len(log.clients) < self.t:
            n = of or len(expected)
            raise ProtocolError(
                f"secagg round {self.round}: only {len(log.clients)} of {n} clients completed "
                f"stage {stage!r}, below the threshold t={self.t}; round aborted"
            )
        return log.clients

    # stage 0 -> messages of stage 1
    def collect_keys(self, replies: dict[int, Message], sampled: int | None = None) -> dict[int, Message]:
        """``sampled``: how many clients were asked to train (those lost before this stage count too)."""
        t0 = time.perf_counter()

        def check(cid: int, m: Message) -> None:
            self.c_pk[cid] = _require(
                m, "c_pk", f"client {cid} ({ADVERTISE})", np.uint8, (KEY_BYTES,)
            ).tobytes()
            self.s_pk[cid] = _require(
                m, "s_pk", f"client {cid} ({ADVERTISE})", np.uint8, (KEY_BYTES,)
            ).tobytes()

        self.u1 = self._accept(ADVERTISE, sorted(replies), replies, check, of=max(sampled or 0, len(replies)))
        cids = np.asarray(self.u1, dtype=np.int64)
        keys = Message(
            arrays={
                "cids": cids,
                "c_pk": np.stack([_u8(self.c_pk[c]) for c in self.u1]),
                "s_pk": np.stack([_u8(self.s_pk[c]) for c in self.u1]),
            },
            scalars={
                "threshold": self.t,
                "round": self.round,
                "neighbors": self.k,
                "graph_seed": self.graph_seed,
            },
        )
        self.nbrs = neighbours(self.u1, self.k, self.graph_seed)
        self.log[ADVERTISE].server_seconds += time.perf_counter() - t0
        return {c: keys for c in self.u1}

    # stage 1 -> messages of stage 2
    def route_shares(self, replies: dict[int, Message]) -> dict[int, Message]:
        t0 = time.perf_counter()
        inbox: dict[int, tuple[list[int], list[np.ndarray]]] = {c: ([], []) for c in self.u1}

        def check(cid: int, m: Message) -> None:
            who = f"client {cid} ({SHARE})"
            to = _require(m, "to", who, np.int64, (None,))
            ct = _require(m, "ct", who, np.uint8, (len(to), CT_BYTES))
            if sorted(to.tolist()) != sorted(self.nbrs[cid]):
                raise ProtocolError(f"secagg: {who}: shares must go to each of its neighbours exactly once")
            for v, row in zip(to.tolist(), ct, strict=True):
                inbox[v][0].append(cid)
                inbox[v][1].append(row)

        self.u2 = self._accept(SHARE, self.u1, replies, check)
        alive = set(self.u2)
        out = {}
        for v in self.u2:
            pairs = sorted((u, row) for u, row in zip(*inbox[v], strict=True) if u in alive)
            frm = np.asarray([u for u, _ in pairs], dtype=np.int64)
            cts = np.stack([row for _, row in pairs]) if pairs else np.zeros((0, CT_BYTES), np.uint8)
            out[v] = Message(arrays={"from": frm, "ct": cts})
        self.log[SHARE].server_seconds += time.perf_counter() - t0
        return out

    # stage 2 -> messages of stage 3
    def collect_masked(self, replies: dict[int, Message]) -> dict[int, Message]:
        t0 = time.perf_counter()
        acc = np.zeros(self.length, dtype=np.uint64)

        def check(cid: int, m: Message) -> None:
            if "y" not in m.arrays:
                raise ProtocolError(f"secagg: client {cid} ({MASK}): message has no 'y' array")
            y = self.codec.from_wire(m.arrays["y"], self.length)
            acc[:] += y

        self.u3 = self._accept(MASK, self.u2, replies, check)
        self.masked_sum = acc
        alive = Message(arrays={"alive": np.asarray(self.u3, dtype=np.int64)})
        self.log[MASK].server_seconds += time.perf_counter() - t0
        return {c: alive for c in self.u3}

    # stage 3 -> the sum of U3's inputs
    def unmask(self, replies: dict[int, Message]) -> np.ndarray:
        t0 = time.perf_counter()
        assert self.masked_sum is not None
        alive, dropped = set(self.u3), [c for c in self.u2 if c not in set(self.u3)]
        b_shares: dict[int, dict[int, np.ndarray]] = {u: {} for u in self.u3}
        s_shares: dict[int, dict[int, np.ndarray]] = {u: {} for u in dropped}

        def check(cid: int, m: Message) -> None:
            who = f"client {cid} ({UNMASK})"
            b_of = _require(m, "b_of", who, np.int64, (None,))
            b_sh = _require(m, "b_share", who, np.int64, (len(b_of), _MB))
            s_of = _require(m, "s_of", who, np.int64, (None,))
            s_sh = _require(m, "s_share", who, np.int64, (len(s_of), _MS))
            if set(b_of.tolist()) - alive or set(s_of.tolist()) - set(dropped):
                raise ProtocolError(f"secagg: {who}: shares for clients outside U3 / U2 \\ U3")
            for u, sh in zip(b_of.tolist(), b_sh, strict=True):
                b_shares[u][cid] = sh
            for u, sh in zip(s_of.tolist(), s_sh, strict=True):
                s_shares[u][cid] = sh

        self._accept(UNMASK, self.u3, replies, check)
        total = self.masked_sum.copy()
        lagrange: dict[tuple[int, ...], np.ndarray] = {}

        def reconstruct(u: int, held: dict[int, np.ndarray], what: str) -> np.ndarray:
            holders = sorted(held)[: self.t]
            if len(holders) < self.t:
                raise ProtocolError(
                    f"secagg round {self.round}: only {len(holders)} shares of client {u}'s {what} arrived, "
                    f"below the threshold t={self.t}; round aborted"
                )
            key = tuple(holders)
            if key not in lagrange:
                lagrange[key] = _shamir.lagrange_at_zero(np.asarray(holders) + 1)
            return _shamir.combine(
                np.asarray(holders) + 1, np.stack([held[h] for h in holders]), lagrange[key]
            )

        prg = MaskStream(self.length)
        for u in self.u3:
            prg.apply(total, elements_to_bytes(reconstruct(u, b_shares[u], "mask seed"), SEED_BYTES), -1)
        for u in dropped:
            s_raw = elements_to_bytes(reconstruct(u, s_shares[u], "mask key"), KEY_BYTES)
            s_sk = private_key(s_raw)
            if _public_of(s_raw) != self.s_pk[u]:
                raise ProtocolError(
                    f"secagg round {self.round}: client {u}'s reconstructed key does not match its public key"
                )
            for v in self.u3:
                if v not in self.nbrs[u]:
                    continue
                # v added +PRG(s_uv) when v < u and -PRG(s_uv) otherwise; undo it.
                prg.apply(total, agree(s_sk, self.s_pk[v], b"mask", self.round), -1 if v < u else +1)
        self.log[UNMASK].server_seconds += time.perf_counter() - t0
        return self.codec.reduce(total)

    def summary(self) -> dict[str, Any]:
        return {
            "survivors": len(self.u3) if self.log[UNMASK].clients else 0,
            "dropped": {s: self.log[s].dropped for s in STAGES if self.log[s].dropped},
            "recovered": [c for c in self.u2 if c not in set(self.u3)],
            "server_seconds": {s: round(self.log[s].server_seconds, 6) for s in STAGES},
        }


def _public_of(private: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization as ser

    pk = X25519PrivateKey.from_private_bytes(private).public_key()
    return pk.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
