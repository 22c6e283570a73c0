"""Malicious clients for measuring defences: model poisoning (sign flipping, scaling / model
replacement, Gaussian updates) and data poisoning (label flipping, a pixel-trigger backdoor).
See docs/robustness.md."""

from fedmtl.attacks.malicious import MaliciousClients, choose_malicious

__all__ = ["MaliciousClients", "choose_malicious"]
