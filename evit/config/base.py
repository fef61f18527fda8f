"""What every params section shares: the frozen, strict base model, the number types, the error.

A section forbids unknown keys (a typo in a knob must not silently fall back to a
default) and is frozen (a validated section is a value: it can key caches, and a stage
cannot change the settings another stage reads).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from evit.errors import UserError


class ConfigError(UserError, ValueError):
    """params.yaml is missing, malformed or has a value outside what is accepted."""


class Section(BaseModel):
    """Base of every params section (and of the whole file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
