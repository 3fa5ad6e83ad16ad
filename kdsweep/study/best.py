"""Which trial is a study's best, decided in one place: the highest validation accuracy, ties to the earliest trial.

The study's summary and parent run and `kdsweep status` (from Optuna's trials), and the report and
`kdsweep confirm` (from MLflow's trial runs) all ask here, so they never name different trials.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from kdsweep.tracking.vocabulary import STATE_COMPLETE, STATE_TAG

T = TypeVar("T")


def ranked(items: Iterable[T], value: Callable[[T], float], number: Callable[[T], int]) -> list[T]:
    """Best first: the highest value (validation accuracy); equal values in trial order (lowest number first)."""
    return sorted(items, key=lambda t: (-value(t), number(t)))


def best_trial(trials: Iterable[Any]) -> Any | None:
    """The best COMPLETE trial among Optuna's (FrozenTrial) trials, or None."""
    done = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]
    return next(iter(ranked(done, lambda t: t.value, lambda t: t.number)), None)


def ranked_runs(runs: Iterable[Any]) -> list[Any]:
    """MLflow trial runs that completed with a validation accuracy, best first (the report's fallbacks follow in order)."""
    done = [r for r in runs if r.data.tags.get(STATE_TAG) == STATE_COMPLETE and "best_val_acc" in r.data.metrics]
    return ranked(done, lambda r: r.data.metrics["best_val_acc"], lambda r: int(r.data.tags.get("kdsweep.trial", 0)))


def best_run(runs: Iterable[Any]) -> Any | None:
    """The best trial run of a study in MLflow, or None: the same rule as best_trial, on what MLflow holds."""
    return next(iter(ranked_runs(runs)), None)
