"""Search-space declarations: typed, small, and turned into Optuna suggestions in one place."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Mapping

from kdsweep.common.errors import UserError

# A best value this close to an end of its range (as a share of the range) suggests the range was too small.
EDGE_MARGIN = 0.05


@dataclass(frozen=True)
class Float:
    """A float hyperparameter searched on [low, high]; `default` is used when it is fixed."""

    low: float
    high: float
    default: float
    log: bool = False
    # Values it cannot pass whatever the range (a mixing weight's 0 and 1): a best value there needs no wider range.
    floor: float | None = None
    ceiling: float | None = None

    def check(self, name: str) -> "Float":
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise UserError(f"bad range for {name!r}: low={self.low} must be < high={self.high}")
        if self.log and self.low <= 0:
            raise UserError(f"bad range for {name!r}: a log range needs low > 0 (got {self.low})")
        return self

    def suggest(self, trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def settings(self) -> dict[str, Any]:
        """What a study searches: the range, its default and scale (part of a study's settings; floor and ceiling
        are facts about the hyperparameter, not choices)."""
        return {"low": self.low, "high": self.high, "default": self.default, "log": self.log}

    def describe(self) -> str:
        return f"[{self.low:g}, {self.high:g}]{' log' if self.log else ''}"

    def to_param(self) -> str:
        """The range as an MLflow param: JSON `{"low": .., "high": .., "log": ..}`, read back by from_param."""
        return json.dumps({"low": self.low, "high": self.high, "log": self.log})

    @classmethod
    def from_param(cls, text: str) -> Float | None:
        """A range as logged: JSON (to_param), or the text `[low, high] log` of stores written before it; None if neither.

        `default` is not logged: the range's low end stands in (a read-back range is only compared, never fixed).
        """
        try:
            d = json.loads(text)
            low, high, log = float(d["low"]), float(d["high"]), bool(d["log"])
        except (ValueError, TypeError, KeyError):
            body, bracket, rest = text.partition("]")
            low_text, comma, high_text = body.removeprefix("[").partition(",")
            if not (body.startswith("[") and bracket and comma and rest.strip() in ("", "log")):
                return None
            try:
                low, high, log = float(low_text), float(high_text), rest.strip() == "log"
            except ValueError:
                return None
        return cls(low, high, low, log=log)

    def edge(self, value: float, margin: float = EDGE_MARGIN) -> str | None:
        """'top'/'bottom' when `value` lies within `margin` of the range's width (log width for log ranges) of an end."""
        f = math.log if self.log else float
        pos = (f(value) - f(self.low)) / (f(self.high) - f(self.low))
        return "bottom" if pos <= margin else "top" if pos >= 1 - margin else None


def edge_warnings(best: Mapping[str, float], space: Mapping[str, Float]) -> list[str]:
    """One sentence per best hyperparameter that sits at an end of its searched range."""
    out = []
    for name, dist in space.items():
        where = dist.edge(best[name]) if name in best else None
        end = (dist.floor if where == "bottom" else dist.ceiling) if where else None
        if end is not None and (dist.low <= end if where == "bottom" else dist.high >= end):
            out.append(f"{name}={best[name]:.4g} is at the {where} of {dist.describe()}, where {name} ends ({end:g}): "
                       f"the tuned method wants as {'little' if where == 'bottom' else 'much'} of it as it can have")
        elif where:
            out.append(f"{name}={best[name]:.4g} is at the {where} of {dist.describe()}: widen the range")
    return out


# Every method's learning rate is always searched, over a range that depends on the optimiser (the
# one place it is defined): Adam's useful steps are one to two orders of magnitude below SGD's.
LR_RANGES: dict[str, Float] = {
    "sgd": Float(1e-3, 0.3, 0.05, log=True),
    "adam": Float(1e-4, 0.1, 1e-3, log=True),
    "adamw": Float(1e-4, 0.1, 1e-3, log=True),
}
OPTIMIZERS = tuple(LR_RANGES)
MOMENTUM = 0.9  # SGD's momentum, Adam's and AdamW's beta1, unless a study sets another (--momentum)
LR = LR_RANGES["sgd"]


def lr_range(optimizer: str) -> Float:
    """The learning-rate range searched with `optimizer`."""
    if optimizer not in LR_RANGES:
        raise UserError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    return LR_RANGES[optimizer]


def apply_overrides(space: Mapping[str, Float], search: Mapping[str, Any], fixed: Mapping[str, Any]) -> tuple[dict[str, Float], dict[str, float]]:
    """Merge a study file's [search] ranges and [fixed] values into a method's space.

    Returns (searched space, fixed values). Unknown names and bad ranges raise UserError.
    """
    out = dict(space)
    for name, spec in search.items():
        if name not in out:
            raise UserError(f"[search] names {name!r}, which this method does not have; it has: {', '.join(out)}")
        if not isinstance(spec, Mapping) or not set(spec) <= {"low", "high", "log"}:
            raise UserError(f"[search] {name} must be a table like {{low = 0.1, high = 1.0, log = true}}")
        try:
            out[name] = replace(out[name], **{k: (bool(v) if k == "log" else float(v)) for k, v in spec.items()}).check(name)
        except (TypeError, ValueError):
            raise UserError(f"[search] {name}: low/high must be numbers") from None
    fixed_values = {}
    for name, value in fixed.items():
        if name not in out:
            raise UserError(f"[fixed] names {name!r}, which this method does not have; it has: {', '.join(out)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"[fixed] {name} must be a number, got {value!r}")
        fixed_values[name] = float(value)
        del out[name]
    return out, fixed_values
