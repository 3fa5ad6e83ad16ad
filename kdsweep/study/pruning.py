"""Pruning decided in memory: Optuna's pruner, asked about a trial's curve against the study as read once.

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
