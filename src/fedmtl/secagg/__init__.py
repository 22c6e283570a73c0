"""Secure aggregation: pairwise masking with Shamir recovery of dropped clients (Bonawitz et al.
2017) and, optionally, CKKS homomorphic summation (TenSEAL). See docs/secagg.md."""

from fedmtl.secagg.channel import LocalClients, Traffic, protocol_stages, run_stages, secure_sum
from fedmtl.secagg.protocol import STAGES, SecAggServer
from fedmtl.secagg.quantize import RingCodec
from fedmtl.secagg.shamir import Shamir

__all__ = [
    "STAGES",
    "LocalClients",
    "RingCodec",
    "SecAggServer",
    "Shamir",
    "Traffic",
    "protocol_stages",
    "run_stages",
    "secure_sum",
]
