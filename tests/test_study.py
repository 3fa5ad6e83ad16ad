"""A full tiny study through the CLI: what MLflow and Optuna hold afterwards, resume, pruning."""

from __future__ import annotations

import os

import optuna
import pytest
from mlflow.tracking import MlflowClient

STUDY = "vanilla_kd-digits-digitnet_l-digitnet_s-s0-e2-b32"
EXPERIMENT = "kdsweep/digits/digitnet_l->digitnet_s"


def _runs(role: str, study: str = STUDY):
    client = MlflowClient(f"sqlite:///{os.getcwd()}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client, client.search_runs([exp.experiment_id], f"tags.`kdsweep.role` = '{role}' and tags.`kdsweep.study` = '{study}'")


def _study(name: str = STUDY):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{os.getcwd()}/mlruns/optuna.db")


def test_study_logs_everything_and_resumes(kdsweep):
    code, out, err = kdsweep("study", "vanilla_kd", "--trials", 3, "--epochs", 2, "--dataset", "digits")
    assert code == 0, err
    assert "best trial" in out and "kdsweep ui" in out
    assert "new MLflow store" in out  # said by the first study in a folder

    client, parents = _runs("study")
    _, children = _runs("trial")
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0].info.run_id
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.info.status == "FINISHED" and run.data.tags["kdsweep.state"] == "COMPLETE"
        assert {"temperature", "alpha", "lr", "seed", "dataset", "teacher", "student", "epochs"} <= set(run.data.params)
        for metric in ("val_acc", "train_loss", "train_kd", "train_ce", "train_acc", "val_loss", "lr", "epoch_seconds"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [0, 1], metric
        assert 0 <= run.data.metrics["test_acc"] <= 1
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")]
        assert artifacts == ["checkpoint/student.pt"]

    study = _study()
    assert study.metric_names == ["val_acc"]  # optuna-dashboard shows the objective's name, not "Objective 0"
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 3
    assert {t.user_attrs["mlflow_run_id"] for t in complete} == {r.info.run_id for r in children}
    for t in complete:  # each trial's curve reached Optuna (with its end, pruning.Reports) as MLflow has it
        history = client.get_metric_history(t.user_attrs["mlflow_run_id"], "val_acc")
        assert t.intermediate_values == {m.step: pytest.approx(m.value) for m in history}
    # The parent holds the best trial's params and metrics.
    best = client.get_run(parent)
    assert best.data.metrics["best_val_acc"] == pytest.approx(study.best_value)
    assert best.data.tags["best.run_id"] == study.best_trial.user_attrs["mlflow_run_id"]
    assert float(best.data.tags["best.temperature"]) == pytest.approx(study.best_params["temperature"], rel=1e-5)

    # Same command, more trials: exactly two more, same study, same parent run.
    code, out, err = kdsweep("study", "vanilla_kd", "--trials", 5, "--epochs", 2, "--dataset", "digits")
    assert code == 0, err
    assert "new MLflow store" not in out + err  # once per store
    _, parents = _runs("study")
    _, children = _runs("trial")
    assert [p.info.run_id for p in parents] == [parent]
    assert len(children) == 5
    assert len(_study().get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 5
    # Resumed trials explore new points rather than replaying the first ones.
    params = [tuple(t.params.values()) for t in _study().trials]
    assert len(set(params)) == 5

    # Already complete: nothing to do, still exit 0.
    code, out, _ = kdsweep("study", "vanilla_kd", "--trials", 5, "--epochs", 2, "--dataset", "digits")
    assert code == 0 and "nothing to run" in out


def test_other_budget_is_another_study_and_other_search_settings_are_refused(kdsweep):
    assert kdsweep("study", "ce", "--trials", 1, "--epochs", 1, "--dataset", "digits")[0] == 0
    # Other epochs: what a trial computes differs, so it is a new study with its own readable name.
    code, out, err = kdsweep("study", "ce", "--trials", 1, "--epochs", 2, "--dataset", "digits")
    assert code == 0, err
    names = set(optuna.get_all_study_names(f"sqlite:///{os.getcwd()}/mlruns/optuna.db"))
    assert names == {"ce-digits-digitnet_l-digitnet_s-s0-e1-b32", "ce-digits-digitnet_l-digitnet_s-s0-e2-b32"}
    # Another sampler on the same study would mix two searches in one: refused before anything trains.
    code, _, err = kdsweep("study", "ce", "--trials", 2, "--epochs", 1, "--dataset", "digits", "--sampler", "random")
    assert code == 2 and "sampler: tpe -> random" in err
    assert len(_study("ce-digits-digitnet_l-digitnet_s-s0-e1-b32").trials) == 1


@pytest.mark.slow  # an 8-trial, 3-epoch study; pruning (lockstep and sequential) stays in the default tier in test_perf
def test_ce_study_with_median_pruner_prunes_and_marks_runs(kdsweep):
    code, out, err = kdsweep("study", "ce", "--trials", 8, "--epochs", 3, "--dataset", "digits", "--pruner", "median",
                             "--sampler", "random")
    assert code == 0, err
    study = _study("ce-digits-digitnet_l-digitnet_s-s0-e3-b32")
    pruned = study.get_trials(states=(optuna.trial.TrialState.PRUNED,))
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) + len(pruned) == 8  # --trials counts every trial that trained
    assert pruned, "a median pruner over 8 random trials should prune at least one"
    assert all(t.user_attrs["kdsweep.epochs_trained"] == len(t.intermediate_values) for t in pruned + complete)
    client, runs = _runs("trial", "ce-digits-digitnet_l-digitnet_s-s0-e3-b32")
    by_id = {r.info.run_id: r for r in runs}
    for t in pruned:
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "KILLED"
        assert run.data.tags["kdsweep.state"] == "PRUNED"
        assert int(run.data.tags["kdsweep.pruned_at_epoch"]) == max(t.intermediate_values)
        assert "test_acc" not in run.data.metrics  # a pruned trial never touches test
    # The ce baseline trains no teacher and logs no distillation term.
    assert all("train_kd" not in r.data.metrics for r in runs)


def test_closing_a_stopped_trial_never_masks_why_it_stopped(monkeypatch):
    """A Ctrl-C inside an MLflow write can leave the store locked: cleanup warns instead of raising."""
    from types import SimpleNamespace

    from kdsweep.study import outcome

    said, calls = [], []

    class LockedTracker:
        def log(self, *a, **k):
            calls.append("log")
            raise RuntimeError("database is locked")

        def end(self, *a, **k):
            raise AssertionError("not reached")

    monkeypatch.setattr(outcome.time, "sleep", lambda s: None)
    rec = outcome.Records(LockedTracker(), "r1", say=said.append)
    rec.trial = SimpleNamespace(number=7)  # only named in the warning: its Optuna side is not what is tested here
    monkeypatch.setattr(outcome, "_write_optuna", lambda *a: (outcome.INTERRUPTED, None))
    ended = outcome.end_trial(rec, outcome.INTERRUPTED, outcome.Ending(error=KeyboardInterrupt()))  # must not raise
    assert ended is outcome.INTERRUPTED
    assert calls == ["log", "log"]  # tried again once
    assert len(said) == 1 and "could not close MLflow run r1 of trial 7" in said[0]
