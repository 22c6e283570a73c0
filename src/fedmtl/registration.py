"""What the user registries (datasets, models) share: re-running a registration is harmless, and a
registered model's config keys are checked like a built-in model's."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


def same_definition(old: Any, new: Any) -> bool:
    """The same function defined again: a notebook cell or a module run twice (same module and
    qualified name), which replaces the earlier one rather than clashing with it."""
    if old is None or new is None or str(getattr(new, "__qualname__", "")).endswith("<lambda>"):
        return False  # lambdas share one name: never taken for each other
    key = ("__module__", "__qualname__")
    return all(getattr(old, k, None) == getattr(new, k, None) is not None for k in key)


def described(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"


def strict(params: type[BaseModel]) -> type[BaseModel]:
    """``params`` refusing keys it does not declare (pydantic ignores them by default), so a typo
    in a registered model's keys is an error, as for the built-in models."""
    if params.model_config.get("extra") == "forbid":
        return params
    config = ConfigDict(**{**params.model_config, "extra": "forbid"})  # type: ignore[typeddict-item]
    return type(params.__name__, (params,), {"model_config": config, "__module__": params.__module__})
