"""The trial state machine (kdsweep/study/outcome.py): its table row by row, classify, and end_trial's writes."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from reliability_helpers import load_trials, mlflow_runs

from kdsweep.study import outcome as oc
from kdsweep.study.budget import Spent
from kdsweep.tracking.vocabulary import EPOCHS_ATTR, REASON_ATTR, REASON_TAG, STATE_TAG
from kdsweep.training.loop import NonFiniteLoss

# name: (Optuna state, MLflow status, kdsweep.state tag, counts toward the budget, retried, study goes on)
TABLE = {
    "complete": (TrialState.COMPLETE, "FINISHED", "COMPLETE", True, False, True),
    "pruned": (TrialState.PRUNED, "KILLED", "PRUNED", True, False, True),
    "diverged": (TrialState.FAIL, "FAILED", "FAIL", True, False, True),
    "out of memory": (TrialState.FAIL, "FAILED", "FAIL", True, False, True),
    "interrupted": (TrialState.FAIL, "KILLED", "FAIL", False, False, False),
    "bug": (TrialState.FAIL, "FAILED", "FAIL", False, False, False),
    "worker lost": (TrialState.FAIL, "KILLED", "FAIL", False, True, True),
    "failed as stale while running": (TrialState.FAIL, "KILLED", "FAIL", False, True, True),
    "orphaned run": (None, "KILLED", "ORPHANED", False, False, True),
}


@pytest.mark.parametrize("name", TABLE)
def test_each_row_of_the_table(name):
    (row,) = [o for o in oc.OUTCOMES if o.name == name]
    assert (row.optuna, row.status, row.tag, row.counts, row.retried, row.goes_on) == TABLE[name]


def test_the_table_has_every_row_once():
    assert sorted(o.name for o in oc.OUTCOMES) == sorted(TABLE)


@pytest.mark.parametrize("error, row", [
    (None, oc.COMPLETE),
    (optuna.TrialPruned("pruned after epoch 2 of 5"), oc.PRUNED),
    (NonFiniteLoss(3), oc.DIVERGED),
    (torch.cuda.OutOfMemoryError("CUDA out of memory"), oc.OUT_OF_MEMORY),
    (KeyboardInterrupt(), oc.INTERRUPTED),
    (type("Terminated", (KeyboardInterrupt,), {})(), oc.INTERRUPTED),  # SIGTERM, as cli.Terminated
    (optuna.exceptions.UpdateFinishedTrialError("finished"), oc.STALE_WHILE_RUNNING),
    (ValueError("a bug"), oc.BUG),
    (RuntimeError("database is locked"), oc.BUG),
])
def test_classify(error, row):
    assert oc.classify(error) is row


def test_reasons():
    assert oc.reason_of(oc.INTERRUPTED, KeyboardInterrupt()) == "interrupted"
    assert oc.reason_of(oc.PRUNED, optuna.TrialPruned("pruned after epoch 2 of 5")) == "pruned after epoch 2 of 5"
    assert oc.reason_of(oc.DIVERGED, NonFiniteLoss(0)) == "NonFiniteLoss: non-finite training loss in epoch 1"
    assert oc.reason_of(oc.BUG, ValueError("first\nsecond")) == "ValueError: first"
    assert oc.reason_of(oc.WORKER_LOST, None, "its worker is gone") == "its worker is gone"
    assert oc.reason_of(oc.COMPLETE) == ""


class FakeTracker:
    """Records MLflow writes, and what Optuna held for the trial at each one (the order end_trial promises)."""

    def __init__(self, storage=None, trial=None):
        self.calls, self.storage, self.trial = [], storage, trial

    def _optuna_state(self):
        return self.storage.get_trial(self.trial._trial_id).state if self.trial is not None else None

    def log(self, run, metrics=(), params=(), tags=(), step=0):
        self.calls.append(("log", run, dict(metrics), dict(tags), self._optuna_state()))

    def end(self, run, status="FINISHED"):
        self.calls.append(("end", run, status, self._optuna_state()))


def _trial():
    study = optuna.create_study(direction="maximize")
    return study, study.ask()


@pytest.mark.parametrize("row, end", [
    (oc.COMPLETE, oc.Ending(epochs=3, seconds=1.5, value=0.9, attrs={"test_acc": 0.8})),
    (oc.PRUNED, oc.Ending(error=optuna.TrialPruned("pruned after epoch 1 of 3"), epochs=1, seconds=0.5,
                          tags={"kdsweep.pruned_at_epoch": 0})),
    (oc.DIVERGED, oc.Ending(error=NonFiniteLoss(1), epochs=2, seconds=1.0, attrs={"failed_at_epoch": 1})),
    (oc.OUT_OF_MEMORY, oc.Ending(error=torch.cuda.OutOfMemoryError("CUDA out of memory"), epochs=2, seconds=1.0)),
    (oc.INTERRUPTED, oc.Ending(error=KeyboardInterrupt(), epochs=2, seconds=1.0)),
    (oc.BUG, oc.Ending(error=ValueError("oops"), epochs=2, seconds=1.0)),
])
def test_end_trial_writes_the_row_in_order(row, end):
    study, trial = _trial()
    tracker, lines = FakeTracker(study._storage, trial), []
    got = oc.end_trial(oc.Records(tracker, "r1", trial, line=lambda t: lines.append(t.state)), row, end)
    assert got is row
    stored = study._storage.get_trial(trial._trial_id)
    assert stored.state == row.optuna
    assert stored.user_attrs.get(EPOCHS_ATTR) == (end.epochs if row.counts else None)  # the budget attribute
    assert Spent.of([stored]).epochs == (end.epochs if row.counts else 0)
    assert (stored.value == end.value) if row is oc.COMPLETE else stored.value is None
    assert (REASON_ATTR in stored.user_attrs) == (row.optuna == TrialState.FAIL)
    log, close = tracker.calls
    # Optuna first (steps 1-2), then the MLflow run written from the outcome recorded (step 3).
    assert log[4] == row.optuna and close[3] == row.optuna
    assert log[3][STATE_TAG] == row.tag and close[2] == row.status
    assert log[2].get("epochs_trained") == (end.epochs if row.counts else None)  # MLflow agrees with the budget
    if row is not oc.COMPLETE:
        assert log[3][REASON_TAG] == oc.reason_of(row, end.error)
    assert lines == ([row.optuna] if row.goes_on else [])  # the progress line comes last, for trials that go on


def test_a_trial_failed_as_stale_by_another_worker_is_not_counted_anywhere():
    from kdsweep.study.workers import fail_trial

    study, trial = _trial()
    said = []
    assert fail_trial(study._storage, study._storage.get_trial(trial._trial_id), "its worker is gone")
    tracker = FakeTracker()
    got = oc.end_trial(oc.Records(tracker, "r1", trial, say=said.append), oc.COMPLETE,
                       oc.Ending(epochs=3, seconds=1.0, value=0.9))
    assert got is oc.STALE_WHILE_RUNNING
    stored = study._storage.get_trial(trial._trial_id)
    assert stored.state == TrialState.FAIL and stored.user_attrs[EPOCHS_ATTR] is None
    assert stored.user_attrs[REASON_ATTR] == "its worker is gone"  # the other worker's reason stays
    (_, _, metrics, tags, _), (_, _, status, _) = tracker.calls
    assert metrics == {} and tags[STATE_TAG] == "FAIL" and status == "KILLED"
    assert tags[REASON_TAG] == "failed as stale by another worker"
    assert "had been marked FAIL by another worker" in said[0]
    # and the worker that failed it as stale cannot do it twice
    assert not fail_trial(study._storage, stored, "again")


def test_a_worker_lost_clears_what_the_trial_had_recorded():
    from kdsweep.study.workers import fail_trial

    study, trial = _trial()
    trial.set_user_attr(EPOCHS_ATTR, 2)  # its worker died after recording its epochs, before ending it
    assert fail_trial(study._storage, study._storage.get_trial(trial._trial_id), "its worker is gone")
    stored = study._storage.get_trial(trial._trial_id)
    assert stored.state == TrialState.FAIL and stored.user_attrs[EPOCHS_ATTR] is None
    assert Spent.of([stored]).trials == 0  # its retry trains it again: it must not count twice


def test_a_run_without_a_trial_ends_through_the_same_table():
    """A confirmation seed has no Optuna trial: only its MLflow run is written."""
    tracker = FakeTracker()
    assert oc.end_trial(oc.Records(tracker, "c1"), oc.COMPLETE, oc.Ending(epochs=3, seconds=2.0)) is oc.COMPLETE
    assert tracker.calls == [("log", "c1", {"epochs_trained": 3, "train_seconds": 2.0}, {STATE_TAG: "COMPLETE"}, None),
                             ("end", "c1", "FINISHED", None)]
    tracker = FakeTracker()
    assert oc.end_trial(oc.Records(tracker, "c2"), oc.DIVERGED, oc.Ending(error=NonFiniteLoss(0), epochs=1)) is oc.DIVERGED
    assert tracker.calls[0][3] == {STATE_TAG: "FAIL", REASON_TAG: "NonFiniteLoss: non-finite training loss in epoch 1"}
    assert tracker.calls[1][2] == "FAILED"


def test_an_optuna_write_that_fails_ends_the_trial_as_that_failure_and_raises():
    study, trial = _trial()
    tracker = FakeTracker()

    class Broken(RuntimeError):
        pass

    real = trial.set_user_attr

    def set_user_attr(key, value):
        if key == "test_acc":
            raise Broken("database is locked")
        real(key, value)

    trial.set_user_attr = set_user_attr
    with pytest.raises(Broken):
        oc.end_trial(oc.Records(tracker, "r1", trial), oc.COMPLETE, oc.Ending(epochs=3, value=0.9, attrs={"test_acc": 0.8}))
    stored = study._storage.get_trial(trial._trial_id)
    assert stored.state == TrialState.FAIL and stored.user_attrs[EPOCHS_ATTR] is None
    assert stored.user_attrs[REASON_ATTR] == "Broken: database is locked"
    assert [c[0] for c in tracker.calls] == ["log", "end"] and tracker.calls[1][2] == "FAILED"


def test_an_interrupt_after_optuna_recorded_the_trial_closes_its_run_as_optuna_recorded_it(monkeypatch):
    """Ctrl-C inside Optuna's tell, after it stored the state (its log line, the sampler's after_trial): the
    trial is COMPLETE, so its run must end FINISHED with its curve, not KILLED as interrupted (a resume then
    found a complete trial without its run and refused the study)."""
    study, trial = _trial()
    tracker = FakeTracker(study._storage, trial)
    tracker.log_steps = lambda run, history: tracker.calls.append(("steps", run, list(history)))
    real = study.tell

    def tell(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "tell", tell)
    with pytest.raises(KeyboardInterrupt):
        oc.end_trial(oc.Records(tracker, "r1", trial), oc.COMPLETE,
                     oc.Ending(epochs=3, value=0.9, history=[(2, {"val_acc": 0.9})]))
    stored = study._storage.get_trial(trial._trial_id)
    assert stored.state == TrialState.COMPLETE and stored.user_attrs[EPOCHS_ATTR] == 3
    assert tracker.calls[0] == ("steps", "r1", [(2, {"val_acc": 0.9})])
    (_, _, metrics, tags, _), (_, _, status, _) = tracker.calls[1:]
    assert (status, tags[STATE_TAG], metrics["epochs_trained"]) == ("FINISHED", "COMPLETE", 3)


# --------------------------------------------------------------------------- out of memory in a --parallel group


def _oom_in_second_epoch(monkeypatch):
    """Every trial runs out of memory early in its second epoch (0-based epoch 1), alone or in a group."""
    from kdsweep.data.device_data import DeviceData

    real = DeviceData.epoch

    def epoch(self, number, batch_size, index=False):
        if number == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, number, batch_size, index=index)

    monkeypatch.setattr(DeviceData, "epoch", epoch)


@pytest.mark.parametrize("parallel", [1, 2])
def test_out_of_memory_counts_the_same_in_budget_mlflow_and_report_alone_or_in_a_group(tmp_path, monkeypatch, parallel):
    from kdsweep.report.stored_studies import StudyRuns
    from kdsweep.study.config import resolve
    from kdsweep.study.loop import run_study

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "cache"))
    _oom_in_second_epoch(monkeypatch)
    (Path(tmp_path) / "mlruns").mkdir()
    storage, tracking = f"sqlite:///{tmp_path}/mlruns/optuna.db", f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    name = f"oom{parallel}"
    cfg = resolve("ce", {"dataset": "digits", "data_size": 300, "trials": 2, "epochs": 3, "pruner": "none", "device": "cpu",
                         "parallel": parallel, "study_name": name, "storage": storage, "tracking_uri": tracking})
    summary = run_study(cfg, say=lambda s: None)
    # Both trials ran out of memory in their second epoch; each trained up to it, and counts (the table's row).
    assert (summary["complete"], summary["failed"], summary["trained"], summary["epochs"]) == (0, 2, 2, 4)

    trials = load_trials(storage, name)
    spent = Spent.of(trials)
    runs, parents = mlflow_runs(tracking, name)
    by_number = {int(r.data.tags["kdsweep.trial"]): r for r in runs}
    for t in trials:
        run = by_number[t.number]
        assert t.state == TrialState.FAIL and "OutOfMemoryError" in t.user_attrs[REASON_ATTR]
        assert run.info.status == "FAILED" and run.data.tags[STATE_TAG] == "FAIL"
        assert t.user_attrs[EPOCHS_ATTR] == run.data.metrics["epochs_trained"] == 2  # budget == MLflow
    report = StudyRuns(run=parents[0], trials=runs, confirms=[])
    assert report.epochs_trained() == spent.epochs == 4  # what the report counts == what the budget counts
    assert len(report._trained()) == spent.trials == 2


# --------------------------------------------------------------------------- a member pruned in a --parallel group


def _group_study(tmp_path, monkeypatch, name: str, epochs: int = 4):
    from kdsweep.study.config import resolve

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "cache"))
    (Path(tmp_path) / "mlruns").mkdir(exist_ok=True)
    storage, tracking = f"sqlite:///{tmp_path}/mlruns/optuna.db", f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    cfg = resolve("ce", {"dataset": "digits", "data_size": 300, "trials": 2, "epochs": epochs, "device": "cpu",
                         "parallel": 2, "study_name": name, "storage": storage, "tracking_uri": tracking})
    return cfg, storage, tracking


def test_a_member_pruned_in_a_group_is_ended_then_not_when_its_group_ends(tmp_path, monkeypatch):
    """Trial 0 is pruned after its first epoch; while trial 1 goes on training in the same group, trial 0 is
    already PRUNED in Optuna (counting its one epoch), its run closed, its heartbeat stopped."""
    import threading

    from kdsweep.study import trial as trial_module
    from kdsweep.study.loop import run_study

    cfg, storage, tracking = _group_study(tmp_path, monkeypatch, "pruned-early")
    seen = []

    def should_prune(trial, curve, completed):
        if trial.number == 0:
            return True
        if len(curve) == 3:  # trial 1's third epoch: look at trial 0 as another worker would
            (first,) = [t for t in trial.study.get_trials(deepcopy=False) if t.number == 0]
            beating = any(t.name == f"kdsweep-heartbeat-{first._trial_id}" for t in threading.enumerate())
            seen.append((first.state, first.user_attrs.get(EPOCHS_ATTR), beating))
        return False

    monkeypatch.setattr(trial_module, "should_prune", should_prune)
    summary = run_study(cfg, say=lambda s: None)
    assert seen == [(TrialState.PRUNED, 1, False)]
    assert (summary["complete"], summary["pruned"], summary["epochs"]) == (1, 1, 5)
    runs, _ = mlflow_runs(tracking, "pruned-early")
    by_number = {int(r.data.tags["kdsweep.trial"]): r for r in runs}
    assert by_number[0].data.tags[STATE_TAG] == "PRUNED" and by_number[0].data.metrics["epochs_trained"] == 1
    assert by_number[1].data.tags[STATE_TAG] == "COMPLETE"
    assert Spent.of(load_trials(storage, "pruned-early")).epochs == 5


def test_an_interrupt_later_in_the_group_leaves_a_pruned_member_pruned(tmp_path, monkeypatch):
    """Ctrl-C in trial 1's second epoch: trial 0, pruned before, keeps its end (counted); trial 1 is interrupted."""
    from kdsweep.study import trial as trial_module
    from kdsweep.study.loop import run_study

    cfg, storage, tracking = _group_study(tmp_path, monkeypatch, "pruned-then-interrupted")

    def should_prune(trial, curve, completed):
        if trial.number == 0:
            return True
        if len(curve) == 2:
            raise KeyboardInterrupt
        return False

    monkeypatch.setattr(trial_module, "should_prune", should_prune)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, say=lambda s: None)
    first, second = sorted(load_trials(storage, "pruned-then-interrupted"), key=lambda t: t.number)
    assert (first.state, first.user_attrs[EPOCHS_ATTR]) == (TrialState.PRUNED, 1)
    assert (second.state, second.user_attrs[REASON_ATTR], second.user_attrs.get(EPOCHS_ATTR)) == \
        (TrialState.FAIL, "interrupted", None)
    runs, _ = mlflow_runs(tracking, "pruned-then-interrupted")
    tags = {int(r.data.tags["kdsweep.trial"]): (r.info.status, r.data.tags[STATE_TAG]) for r in runs}
    assert tags == {0: ("KILLED", "PRUNED"), 1: ("KILLED", "FAIL")}
