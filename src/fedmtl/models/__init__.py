"""Small models for federated runs, found by name. Each declares which parameters are its head."""

from __future__ import annotations

from fedmtl.models import registry as _registry
from fedmtl.models.autoencoder import Autoencoder, AutoencoderParams
from fedmtl.models.registry import ModelInput, build_model, model_names, model_params, register_model

# The multi-task autoencoder of sample selection (docs/selection.md), registered by name.
_registry._MODELS["autoencoder"] = (
    AutoencoderParams,
    lambda p, i: Autoencoder(i.shape, i.num_outputs, p),
)

# FedBone's split network (docs/fedbone.md); its module imports nothing but torch and pydantic.
from fedmtl.fedbone.model import register_model as _register_fedbone  # noqa: E402

_register_fedbone()

__all__ = ["ModelInput", "build_model", "model_names", "model_params", "register_model"]
