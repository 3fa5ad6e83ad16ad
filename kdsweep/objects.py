"""Python objects as study settings: models and data given to the API are named, so a StudyConfig can hold them."""

from __future__ import annotations

from typing import Any

from .errors import UserError

OBJECT_KEYS = ("teacher", "student", "data")


def name_all(flags: dict[str, Any]) -> dict[str, Any]:
    """`flags` with every Python object among teacher, student and data replaced by the name it is registered under."""
    out = dict(flags)
    for key in OBJECT_KEYS:
        if key in out and not isinstance(out[key], str):
            raise UserError(f"{key} must be a name or spec string here, got {type(out[key]).__name__}")
    return out


def model_name(model: Any) -> str:
    raise UserError(f"no study of the model object {type(model).__name__}: pass its name")
