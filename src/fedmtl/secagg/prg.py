"""Key agreement and the pseudo-random generator that turns agreed seeds into masks.

Pairwise seeds come from X25519 (``cryptography``) followed by HKDF-SHA256 with a context string
naming the purpose and the round, so the same key pair never yields the same seed twice and the
share-encryption key is independent of the mask seed.

The PRG is AES-128 in counter mode keyed by the seed (the keystream of encrypting zeros), read as
little-endian uint64 ring elements. Why a cipher and not numpy's PCG64 seeded from HKDF: a mask is
a one-time pad, and the masked update hides the raw one only as well as the mask stream is
indistinguishable from random; PCG64 is a statistical generator whose state can be recovered from
its outputs, AES-CTR is a standard cryptographic PRG (NIST SP 800-90A's CTR_DRBG is built on it).
AES-128 matches X25519's ~128-bit security level, and with AES-NI it is the fastest option here
(measured: about 5.5 GB/s, against 2.8 GB/s for ChaCha20 and 0.5 GB/s for PCG64 integers).
Every seed keys exactly one stream (fresh per round), so the all-zero counter block is safe."""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmtl.errors import ProtocolError

KEY_BYTES = 32  # X25519 private and public keys
SEED_BYTES = 16  # AES-128 keys: mask seeds and pairwise seeds
_ZERO_IV = bytes(16)


def new_keypair() -> tuple[bytes, bytes]:
    """(private, public) raw X25519 keys from the OS's CSPRNG."""
    sk = X25519PrivateKey.generate()
    from cryptography.hazmat.primitives import serialization as ser

    priv = sk.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    pub = sk.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return priv, pub


def new_seed() -> bytes:
    return os.urandom(SEED_BYTES)


def private_key(raw: bytes) -> X25519PrivateKey:
    """Parse once, agree many times (parsing costs as much as an agreement)."""
    try:
        return X25519PrivateKey.from_private_bytes(raw)
    except ValueError as exc:
        raise ProtocolError(f"secagg: bad private key: {exc}") from None


def agree(
    private: bytes | X25519PrivateKey, public: bytes, purpose: bytes, round: int, length: int = SEED_BYTES
) -> bytes:
    """HKDF(X25519(private, public)) bound to a purpose and a round: both sides get the same bytes."""
    key = private_key(private) if isinstance(private, bytes) else private
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # low-order point, wrong length
        raise ProtocolError(f"secagg: key agreement failed: {exc}") from None
    info = b"fedmtl-secagg/" + purpose + b"/" + str(int(round)).encode()
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(shared)


class MaskStream:
    """Adds or subtracts PRG(seed) into an accumulator through one reused keystream buffer, so
    the thousands of masks of a large round cost no allocations."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._zeros = bytes(8 * n)
        self._buf = bytearray(8 * n + 15)  # update_into needs room for one block more
        self._view = np.frombuffer(self._buf, dtype="<u8", count=n)

    def apply(self, acc: np.ndarray, seed: bytes, sign: int) -> None:
        if len(seed) != SEED_BYTES:
            raise ProtocolError(f"secagg: PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
        enc = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()
        enc.update_into(self._zeros, self._buf)
        if sign > 0:
            np.add(acc, self._view, out=acc)
        else:
            np.subtract(acc, self._view, out=acc)


def expand(seed: bytes, n: int) -> np.ndarray:
    """``n`` pseudo-random uint64 ring elements from a 16-byte seed (AES-128-CTR keystream)."""
    if len(seed) != SEED_BYTES:
        raise ProtocolError(f"secagg: PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
    enc = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()
    stream = enc.update(bytes(8 * n)) + enc.finalize()
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)
