"""Pruning decided in memory: Optuna's pruner, asked about a trial's curve against the study as read once;
and the curve written to Optuna's storage in few transactions (`Reports`), since nothing reads it meanwhile.

`Trial.should_prune()` reads the trial and every completed trial of the study from the storage, each
epoch of each trial: on SQLite about 10 ms at 20 trials, growing with the study, more than a small
model's epoch. The median and percentile pruners compare a trial's curve only with the curves of
COMPLETE trials, which change when a trial completes, not while a group of trials trains. So a group
reads them once when it starts (`Completed`), and each epoch's decision is the pruner's own `prune`
on that view. A trial that another worker completes meanwhile joins the comparison from the next
group on, as it would a few seconds late with Optuna's own call. Other pruners (Hyperband keeps its
rungs in the storage) are asked the usual way.
"""

from __future__ import annotations

import time

import optuna
from optuna.pruners import NopPruner, PercentilePruner
from optuna.trial import TrialState


class Completed:
    """A study as the percentile pruners see it, read once: its direction and its COMPLETE trials."""

    def __init__(self, study: optuna.Study):
        self.direction = study.direction
        self.directions = study.directions
        self._trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    def get_trials(self, deepcopy: bool = True, states: tuple[TrialState, ...] | None = None) -> list:
        if states != (TrialState.COMPLETE,):
            raise ValueError("Completed holds the COMPLETE trials only")  # what PercentilePruner asks for
        return list(self._trials)


def in_memory(pruner: optuna.pruners.BasePruner) -> bool:
    """Whether `pruner` decides from the completed trials alone (then `should_prune` needs no storage read)."""
    return isinstance(pruner, (PercentilePruner, NopPruner))  # MedianPruner is a PercentilePruner


def should_prune(trial: optuna.Trial, curve: dict[int, float], completed: Completed | None) -> bool:
    """Whether the pruner stops `trial`, whose reported values so far are `curve` (epoch -> val_acc)."""
    pruner = trial.study.pruner
    if completed is None or not in_memory(pruner):
        return trial.should_prune()
    now = optuna.trial.create_trial(state=TrialState.RUNNING, intermediate_values=dict(curve))
    return pruner.prune(completed, now)


def write_reports(storage, trial_id: int, values: dict[int, float]) -> None:
    """A trial's intermediate values (epoch -> val_acc) in one transaction. Optuna's `report` commits one at a
    time (about 1.6 ms each on SQLite, more than a small model's epoch), and its per-value write reads the trial
    and the step again for each value (30 values: 16-17 ms against 2-2.4 ms here, benchmarks/curve_write.py).
    Through Optuna's RDB tables as that write does, the same checks and rows, where the storage is an
    RDBStorage; else value by value."""
    if not values:
        return
    rdb = getattr(storage, "_backend", storage)  # under Optuna's cache, which holds finished trials only
    if not isinstance(rdb, optuna.storages.RDBStorage):
        for step, value in values.items():
            storage.set_trial_intermediate_value(trial_id, step, value)
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    rows = models.TrialIntermediateValueModel
    with _create_scoped_session(rdb.scoped_session, True) as session:
        trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
        rdb.check_trial_is_updatable(trial_id, trial.state)  # a trial failed as stale meanwhile refuses, as in Optuna
        kept = {row.step: row for row in session.query(rows).filter(rows.trial_id == trial_id)}
        for step, value in values.items():
            stored, kind = rows.intermediate_value_to_stored_repr(value)
            if step in kept:
                kept[step].intermediate_value, kept[step].intermediate_value_type = stored, kind
            else:
                session.add(rows(trial_id=trial_id, step=step, intermediate_value=stored, intermediate_value_type=kind))


class Reports:
    """A trial's per-epoch values on their way to Optuna's storage: at most every `every` seconds, in one
    transaction, and the rest with the trial's end (outcome.end_trial writes them before its state, so a
    completed trial carries its whole curve for every worker's pruner). A pruner that reads the storage
    (`in_memory` false: Hyperband) gets each value at once.

    Until then only this process knows them: a trial killed meanwhile is failed as stale and retried, and
    its curve is not kept (nor counted: its epochs are counted from its end's attribute, budget.py).
    """

    def __init__(self, trial: optuna.Trial, at_once: bool, every: float = 15.0):
        self.trial, self.every = trial, 0.0 if at_once else every
        self.values: dict[int, float] = {}
        self.sent_at = time.monotonic()

    def add(self, epoch: int, value: float) -> None:
        self.values[epoch] = value
        if time.monotonic() - self.sent_at >= self.every:
            write_reports(self.trial.storage, self.trial._trial_id, self.take())

    def take(self) -> dict[int, float]:
        """The values not written yet (for the trial's end to write), and the clock restarted."""
        values, self.values = self.values, {}
        self.sent_at = time.monotonic()
        return values
