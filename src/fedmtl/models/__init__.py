"""Small models for federated runs, found by name. Each declares which parameters are its head."""

from __future__ import annotations

from fedmtl.models import registry as _registry
from fedmtl.models.autoencoder import Autoencoder, AutoencoderParams
from fedmtl.models.registry import build_model, model_names, model_params

# The multi-task autoencoder of sample selection (docs/selection.md), registered by name.
_registry._MODELS["autoencoder"] = (
    AutoencoderParams,
    lambda p, shape, out: Autoencoder(tuple(shape), out, p),  # type: ignore[arg-type]
)

# FedBone's split network (docs/fedbone.md); its module imports nothing but torch and pydantic.
from fedmtl.fedbone.model import register_model as _register_fedbone  # noqa: E402

_register_fedbone()

__all__ = ["build_model", "model_names", "model_params"]
