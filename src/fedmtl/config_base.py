"""The base class of every config section, apart from ``fedmtl.config`` so that section schemas
kept next to their code (``fedmtl.features``, ``fedmtl.data.config``, ``fedmtl.aggregation.config``)
can use it without an import cycle."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
