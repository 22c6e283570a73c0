"""``secagg.mode: ckks``: homomorphic summation of updates with CKKS (TenSEAL, optional extra ``he``).

Trust model (the usual single-key HE setup for FL): the clients share one CKKS secret key; the
server holds only the public context (no secret key), receives ciphertexts, adds them, and asks a
key-holding client to decrypt the *sum* only. The server therefore never sees an individual update
in the clear; a key holder never receives an individual ciphertext. Unlike masking, dropouts need
no recovery (the server sums whatever arrived), but the round still aborts below the threshold so
a decrypted "sum" is never a single client's update.

In the simulator the key holder is an in-process client role; distributing the secret key to
Flower nodes is not implemented (documented). CKKS is approximate (about 1e-7 relative error at a
2^40 scale), so updates are not quantised; each client encrypts [w, w * update] in chunks of
``poly_degree / 2`` slots."""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from fedmtl.algorithms.base import Algorithm, ClientWork, Message
from fedmtl.config import Config
from fedmtl.data.federated import ClientData, FederatedData
from fedmtl.errors import ConfigError, ProtocolError
from fedmtl.runtime.validation import reply_problem
from fedmtl.secagg.masking import AGGREGATE, SecureUpdates


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

    # --- server side ---------------------------------------------------------------------------
    def server_step(self, server: dict[str, Any], replies: dict[int, Message], round: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        info: dict[str, Any] = {"secagg_mode": "ckks", "secagg_threshold": self.threshold}
        new = server
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
                    ct = self.ts.ckks_vector_from(self._server_ctx, r.arrays[k].tobytes())
                    total[k] = ct if k not in total else total[k] + ct
            agg = Message(
                arrays={k: np.frombuffer(v.serialize(), dtype=np.uint8).copy() for k, v in total.items()}
            )
            server_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            plain = self.decrypt_sum(agg).arrays["sum"]
            decrypt_seconds = time.perf_counter() - t1
            weight = float(plain[0])
            base = self.inner.broadcast(server, next(iter(self.data.train_clients)))
            length = self.layout(base).size
            reply = self.aggregated(server, plain[1 : 1 + length] / weight, int(round_weight(weight)))
            new = self.inner.server_step(server, {AGGREGATE: reply}, round)
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
        return {**new, "secagg": info}


def round_weight(w: float) -> int:
    """The decrypted total weight (an integer, up to CKKS's tiny error)."""
    return max(1, int(np.rint(w)))
