"""Small models for federated runs, found by name. Each declares which parameters are its head."""

from __future__ import annotations

from fedmtl.models.registry import build_model, model_names, model_params

__all__ = ["build_model", "model_names", "model_params"]
