"""Pruning decided in memory (study/pruning.py) makes the decisions Optuna's own Trial.should_prune makes."""

from __future__ import annotations

import math
import random

import optuna
import pytest

from kdsweep.study.pruning import Completed, Reports, in_memory, should_prune, write_reports

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("pruner", [optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
                                    optuna.pruners.PercentilePruner(25.0, n_startup_trials=3),
                                    optuna.pruners.NopPruner()])
def test_in_memory_decisions_equal_optunas(pruner):
    """40 trials of noisy rising curves: every epoch's decision, read against the complete trials as the trial
    started, equals Optuna's (which reads the storage then; no trial completes meanwhile, as within a group)."""
    study = optuna.create_study(direction="maximize", pruner=pruner)
    rnd, calls, pruned = random.Random(0), 0, 0
    assert in_memory(pruner)
    for _ in range(40):
        trial, curve, completed = study.ask(), {}, Completed(study)
        for epoch in range(10):
            curve[epoch] = rnd.random() * 0.3 + epoch * 0.05
            trial.report(curve[epoch], epoch)
            theirs = trial.should_prune()
            assert should_prune(trial, curve, completed) == theirs, (trial.number, epoch)
            calls += 1
            if theirs:
                break
        pruned += theirs
        state = optuna.trial.TrialState.PRUNED if theirs else optuna.trial.TrialState.COMPLETE
        study.tell(trial, None if theirs else curve[epoch], state=state)
    assert calls > 60 and (pruned > 0) is not isinstance(pruner, optuna.pruners.NopPruner)


def test_other_pruners_are_asked_through_the_storage():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.HyperbandPruner(min_resource=1, max_resource=4))
    trial = study.ask()
    trial.report(0.5, 0)
    assert not in_memory(study.pruner)
    assert should_prune(trial, {0: 0.5}, None) == trial.should_prune()
    with pytest.raises(ValueError):  # the view answers only what the percentile pruners ask
        Completed(study).get_trials(states=(optuna.trial.TrialState.PRUNED,))


def _sqlite_study(tmp_path, pruner=None):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db")
    return optuna.create_study(storage=storage, direction="maximize", pruner=pruner), storage


def test_a_curve_is_written_in_one_transaction(tmp_path):
    import sqlalchemy

    study, storage = _sqlite_study(tmp_path)
    trial = study.ask()
    commits = []
    sqlalchemy.event.listen(storage.engine, "commit", lambda conn: commits.append(1))
    write_reports(study._storage, trial._trial_id, {e: 0.5 + e / 100 for e in range(30)})
    assert len(commits) == 1
    assert study.trials[0].intermediate_values == {e: 0.5 + e / 100 for e in range(30)}


def test_a_curve_written_again_replaces_its_steps_and_a_finished_trial_refuses(tmp_path):
    study, _ = _sqlite_study(tmp_path)
    trial = study.ask()
    write_reports(study._storage, trial._trial_id, {0: 0.5, 1: 0.6})
    write_reports(study._storage, trial._trial_id, {1: float("nan"), 2: float("inf"), 3: float("-inf")})
    got = study.trials[0].intermediate_values
    assert got[0] == 0.5 and math.isnan(got[1]) and got[2] == math.inf and got[3] == -math.inf and len(got) == 4
    study.tell(trial, state=optuna.trial.TrialState.FAIL)  # as another worker failing it as stale
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        write_reports(study._storage, trial._trial_id, {4: 0.7})
    assert len(study.trials[0].intermediate_values) == 4
    plain = optuna.create_study()  # not an RDB storage: Optuna's own write, value by value
    other = plain.ask()
    write_reports(plain._storage, other._trial_id, {0: 0.25, 1: 0.5})
    assert plain.trials[0].intermediate_values == {0: 0.25, 1: 0.5}


def test_reports_wait_for_the_trials_end_unless_the_pruner_reads_the_storage(tmp_path):
    study, _ = _sqlite_study(tmp_path)
    trial = study.ask()
    reports = Reports(trial, at_once=False)
    for e in range(5):
        reports.add(e, e / 10)
    assert study.trials[0].intermediate_values == {}  # only this process knows them yet
    assert reports.take() == {e: e / 10 for e in range(5)} and reports.take() == {}

    (tmp_path / "hyperband").mkdir()
    study, _ = _sqlite_study(tmp_path / "hyperband", optuna.pruners.HyperbandPruner(min_resource=1, max_resource=4))
    trial = study.ask()
    reports = Reports(trial, at_once=not in_memory(study.pruner))
    reports.add(0, 0.3)
    assert study.trials[0].intermediate_values == {0: 0.3}  # Hyperband reads them from the storage
