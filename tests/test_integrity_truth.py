"""One truth: Optuna and MLflow agree on a study, or kdsweep says so in one line (issue 9, "What to build" 2).

The attacks that found the gaps: delete the MLflow store and resume (the report then named a trial
that was not the study's best); delete the Optuna store and resume (a new study re-ran old parameters
under the old parent: two runs per trial number); two names that sanitise alike shared one study.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_helpers import REPO, cli_env, load_trials, mlflow_runs

STUDY = ["study", "ce", "--dataset", "digits", "--data-size", "300", "--epochs", "2", "--pruner", "none", "--device", "cpu"]


def _stores(tmp: Path) -> tuple[str, str]:
    return f"sqlite:///{tmp / 'mlruns' / 'optuna.db'}", f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"


def _delete_mlflow_store(tmp: Path) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    db = tmp / "mlruns" / "mlflow.db"
    db.unlink()
    shutil.rmtree(tmp / "mlruns" / "artifacts", ignore_errors=True)
    # In-process runs only: MLflow caches its store and engine per URI, which still point at the deleted file
    # (a new `kdsweep` process starts without them).
    engine = SqlAlchemyStore._engine_map.pop(f"sqlite:///{db}", None)
    if engine is not None:
        engine.dispose()
    _tracking_store_registry._get_store_with_resolved_uri.cache_clear()


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdsweep: error: "), err
    return lines[0]


def _best_named_by_report(tracking: str):
    from kdsweep.report.stored_studies import select
    from kdsweep.tracking.tracker import Tracker

    (s,) = select(Tracker(tracking)).studies
    return s.best


@pytest.fixture
def two_trials(kdsweep, workdir):
    """A study `t` with 2 complete trials in both stores."""
    code, out, err = kdsweep(*STUDY, "--trials", "2", "--study-name", "t")
    assert code == 0, out + err
    return workdir


# --------------------------------------------------------------------------- the MLflow store deleted


def test_mlflow_store_deleted_then_resume_is_refused_in_one_line(kdsweep, two_trials):
    storage, tracking = _stores(two_trials)
    _delete_mlflow_store(two_trials)
    code, out, err = kdsweep(*STUDY, "--trials", "3", "--study-name", "t")
    line = _one_line_error(err)
    assert code == 2
    assert "2 complete Optuna trial(s) without a FINISHED MLflow run (0, 1)" in line and "MLflow store" in line
    assert "--on-mismatch" in line
    assert len(load_trials(storage, "t")) == 2  # nothing trained
    assert mlflow_runs(tracking, "t") == ([], [])  # no parent, no trial run in the new store


def test_mlflow_store_deleted_then_repair_restores_runs_and_the_report_names_optunas_best(kdsweep, two_trials):
    storage, tracking = _stores(two_trials)
    best_before = max((t for t in load_trials(storage, "t") if t.state.name == "COMPLETE"), key=lambda t: t.value)
    _delete_mlflow_store(two_trials)
    code, out, err = kdsweep(*STUDY, "--trials", "3", "--study-name", "t", "--on-mismatch", "repair")
    assert code == 0, out + err
    assert "repaired study 't': 2 run(s) re-created from Optuna's record (no curves, no checkpoint)" in out

    trials = load_trials(storage, "t")
    best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    runs, parents = mlflow_runs(tracking, "t")
    assert len(parents) == 1 and sorted(int(r.data.tags["kdsweep.trial"]) for r in runs) == [0, 1, 2]
    restored = [r for r in runs if "kdsweep.restored" in r.data.tags]
    assert len(restored) == 2 and all(r.info.status == "FINISHED" for r in restored)
    named = _best_named_by_report(tracking)
    assert int(named.data.tags["kdsweep.trial"]) == best.number and named.data.metrics["best_val_acc"] == best.value
    assert best.value >= best_before.value

    # Repaired once: the next start agrees without being told anything.
    code, out, err = kdsweep(*STUDY, "--trials", "3", "--study-name", "t")
    assert code == 0 and "has spent its budget of 3 trials" in out, out + err


# --------------------------------------------------------------------------- Ctrl-C while a trial's end is written


def test_an_interrupt_while_a_group_records_its_trials_leaves_both_stores_agreeing_and_the_study_resumes(
        kdsweep, workdir, monkeypatch):
    """The CI failure of 2026-12-05: a Ctrl-C inside Optuna's tell, after it stored a trial COMPLETE, closed the
    trial's run KILLED as interrupted; the resume refused the study ('complete Optuna trial(s) without a FINISHED
    MLflow run'). Here the interrupt lands in the first member's tell, and the group's second member is still open."""
    import optuna

    storage, tracking = _stores(workdir)
    real = optuna.Study.tell

    def tell(self, trial, *args, **kwargs):
        frozen = real(self, trial, *args, **kwargs)
        if frozen.state.name == "COMPLETE":
            monkeypatch.setattr(optuna.Study, "tell", real)  # once
            raise KeyboardInterrupt
        return frozen

    monkeypatch.setattr(optuna.Study, "tell", tell)
    args = [*STUDY, "--trials", "4", "--study-name", "g", "--parallel", "2", "--cpu-workers", "1", "--sampler", "random"]
    code, out, err = kdsweep(*args)
    assert code == 130, out + err
    trials = load_trials(storage, "g")
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "FAIL"], "nothing is left RUNNING"
    (done,) = [t for t in trials if t.state.name == "COMPLETE"]
    runs, _ = mlflow_runs(tracking, "g")
    by_id = {r.info.run_id: r for r in runs}
    run = by_id[done.user_attrs["mlflow_run_id"]]
    assert (run.info.status, run.data.tags["kdsweep.state"]) == ("FINISHED", "COMPLETE")
    assert run.data.metrics["epochs_trained"] == 2
    code, out, err = kdsweep(*args)
    assert code == 0, out + err
    assert sum(t.state.name == "COMPLETE" for t in load_trials(storage, "g")) == 4


def test_a_complete_trials_run_closed_as_interrupted_is_closed_again_from_optunas_record(kdsweep, two_trials):
    """What the bug above left in a store before it was fixed: the resume ends the run as Optuna recorded its trial."""
    from mlflow.tracking import MlflowClient

    storage, tracking = _stores(two_trials)
    (trial, _) = load_trials(storage, "t")
    client = MlflowClient(tracking)
    run = trial.user_attrs["mlflow_run_id"]
    client.set_tag(run, "kdsweep.state", "FAIL")
    client.set_tag(run, "kdsweep.reason", "interrupted")
    client.set_terminated(run, "KILLED")
    code, out, err = kdsweep(*STUDY, "--trials", "3", "--study-name", "t")
    assert code == 0, out + err
    closed = client.get_run(run)
    assert (closed.info.status, closed.data.tags["kdsweep.state"]) == ("FINISHED", "COMPLETE")
    assert "kdsweep.reason" not in closed.data.tags  # a complete trial has no reason


# --------------------------------------------------------------------------- the Optuna store deleted


def test_optuna_store_deleted_then_resume_is_refused_in_one_line(kdsweep, two_trials):
    storage, tracking = _stores(two_trials)
    (two_trials / "mlruns" / "optuna.db").unlink()
    code, out, err = kdsweep(*STUDY, "--trials", "2", "--study-name", "t")
    line = _one_line_error(err)
    assert code == 2
    assert "belongs to another Optuna study" in line and "2 MLflow trial run(s) without their Optuna trial (trial 0, 1)" in line
    assert "Optuna store" in line
    assert load_trials(storage, "t") == []  # nothing trained
    runs, parents = mlflow_runs(tracking, "t")
    assert len(runs) == 2 and len(parents) == 1


def test_old_parent_collecting_a_new_studys_runs_is_refused(kdsweep, two_trials):
    """The attack as first found: a new study re-ran old parameters under the old parent (an unbound one, from before)."""
    from mlflow.tracking import MlflowClient

    storage, tracking = _stores(two_trials)
    (two_trials / "mlruns" / "optuna.db").unlink()
    _, (parent,) = mlflow_runs(tracking, "t")
    client = MlflowClient(tracking_uri=tracking)
    for tag in ("kdsweep.optuna_study_id", "kdsweep.optuna_created"):  # a parent made before binding existed
        client.delete_tag(parent.info.run_id, tag)
    code, out, err = kdsweep(*STUDY, "--trials", "2", "--study-name", "t", "--on-mismatch", "ignore")
    assert code == 0, out + err
    assert "warning: Optuna and MLflow disagree on study 't'" in out and "--on-mismatch ignore" in out
    runs, parents = mlflow_runs(tracking, "t")
    assert len(runs) == 4 and len(parents) == 1  # two runs per trial number: what ignore allows, and says

    code, out, err = kdsweep(*STUDY, "--trials", "3", "--study-name", "t")
    line = _one_line_error(err)
    assert code == 2 and "2 MLflow trial run(s) without their Optuna trial (trial 0, 1)" in line
    assert len(load_trials(storage, "t")) == 2

    # Repair: the old study's runs and parent retired, the new study's runs moved under a new parent of their own.
    code, out, err = kdsweep(*STUDY, "--trials", "3", "--study-name", "t", "--on-mismatch", "repair")
    assert code == 0, out + err
    assert "2 run(s) of its trials moved under parent" in out
    trials = load_trials(storage, "t")
    held = {t.user_attrs["mlflow_run_id"] for t in trials if t.state.name == "COMPLETE"}
    runs, parents = mlflow_runs(tracking, "t")
    (live,) = [p for p in parents if p.data.tags.get("kdsweep.state") != "ORPHANED"]
    kept = [r for r in runs if r.data.tags["kdsweep.state"] != "ORPHANED"]
    assert len(held) == 3 and {r.info.run_id for r in kept} == held
    assert {r.data.tags["mlflow.parentRunId"] for r in kept} == {live.info.run_id}
    assert _best_named_by_report(tracking).info.run_id in held


def test_optuna_store_deleted_then_repair_retires_the_old_runs_and_the_report_skips_them(kdsweep, two_trials):
    storage, tracking = _stores(two_trials)
    old_runs, (old_parent,) = mlflow_runs(tracking, "t")
    (two_trials / "mlruns" / "optuna.db").unlink()
    code, out, err = kdsweep(*STUDY, "--trials", "2", "--study-name", "t", "--on-mismatch", "repair")
    assert code == 0, out + err
    assert "repaired study 't': 2 MLflow run(s) without their trial marked ORPHANED; parent run" in out

    runs, parents = mlflow_runs(tracking, "t")
    by_id = {r.info.run_id: r for r in runs + parents}
    for old in old_runs + [old_parent]:
        r = by_id[old.info.run_id]
        assert r.data.tags["kdsweep.state"] == "ORPHANED" and r.info.status == "KILLED"
    live = [p for p in parents if p.data.tags.get("kdsweep.state") != "ORPHANED"]
    assert len(live) == 1 and live[0].info.status == "FINISHED"

    trials = load_trials(storage, "t")
    held = {t.user_attrs["mlflow_run_id"] for t in trials if t.state.name == "COMPLETE"}
    assert len(held) == 2
    named = _best_named_by_report(tracking)
    assert named.info.run_id in held  # never a run of the deleted study
    code, out, err = kdsweep(*STUDY, "--trials", "2", "--study-name", "t")
    assert code == 0 and "has spent its budget of 2 trials" in out, out + err


def test_a_parent_from_before_binding_is_adopted_when_everything_agrees(kdsweep, two_trials):
    from mlflow.tracking import MlflowClient

    storage, tracking = _stores(two_trials)
    _, (parent,) = mlflow_runs(tracking, "t")
    bound = {k: v for k, v in parent.data.tags.items() if k.startswith("kdsweep.optuna_")}
    assert set(bound) == {"kdsweep.optuna_study_id", "kdsweep.optuna_created"}
    client = MlflowClient(tracking_uri=tracking)
    for tag in bound:
        client.delete_tag(parent.info.run_id, tag)
    code, out, err = kdsweep(*STUDY, "--trials", "2", "--study-name", "t")
    assert code == 0 and "disagree" not in out + err, out + err
    _, (again,) = mlflow_runs(tracking, "t")
    assert again.info.run_id == parent.info.run_id
    assert {k: v for k, v in again.data.tags.items() if k.startswith("kdsweep.optuna_")} == bound


# --------------------------------------------------------------------------- names


def test_names_that_sanitise_alike_are_two_studies(kdsweep, workdir):
    storage, _ = _stores(workdir)
    outs = []
    for name in ("研究1", "調査1"):
        code, out, err = kdsweep(*STUDY, "--trials", "1", "--study-name", name)
        assert code == 0, out + err
        outs.append(out)
    import optuna

    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    assert len(names) == 2 and all(n.startswith("1-") for n in names)
    for name, out in zip(("研究1", "調査1"), outs):
        assert f"study name {name!r} is stored as '1-" in out
        assert "Resuming" not in out
    code, out, err = kdsweep(*STUDY, "--trials", "2", "--study-name", "研究1")  # said when created, not on resume
    assert code == 0 and "Resuming" in out and "is stored as" not in out, out + err


def test_long_names_sharing_their_first_200_characters_are_two_studies(kdsweep, workdir):
    storage, _ = _stores(workdir)
    long = "a" * 300
    for name in (long, long[:200] + "b" * 100):
        code, out, err = kdsweep(*STUDY, "--trials", "1", "--study-name", name)
        assert code == 0 and "Resuming" not in out, out + err
        assert "is stored as 'aaaa" in out
    import optuna

    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    assert len(set(names)) == 2 and all(len(n) <= 200 for n in names)


def test_a_name_typed_like_anothers_stored_form_is_refused(kdsweep, workdir):
    from kdsweep.study.config import sanitize

    code, out, err = kdsweep(*STUDY, "--trials", "1", "--study-name", "研究1")
    assert code == 0, out + err
    code, out, err = kdsweep(*STUDY, "--trials", "1", "--study-name", sanitize("研究1"))
    line = _one_line_error(err)
    assert code == 2 and "belongs to the name '研究1'" in line


# --------------------------------------------------------------------------- the fault script's other rounds


@pytest.mark.slow  # the fault script end to end; each attack has its own default-tier test
def test_fault_script_reports_store_deletion_teacher_mismatch_and_disk_full(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "fault_test.py"), "--rounds", "store,teacher,disk",
                          "--workdir", str(tmp_path / "fault")], cwd=tmp_path, env=cli_env(tmp_path),
                         capture_output=True, text=True, timeout=600)
    print(out.stdout[-3000:])
    m = re.search(r"^store_deleted=(\S+) teacher_mismatch=(\S+) disk_full=(\S+)$", out.stdout, re.M)
    assert m, out.stdout[-4000:] + out.stderr[-4000:]
    store, teacher, disk = m.groups()
    assert store == "refused"  # both deletions: exit 2, one line, nothing trained; repair then makes the stores agree
    assert "--on-mismatch repair -> exit 0, the stores agree" in out.stdout
    # What kdsweep does on a teacher change and a full disk is measured, not assumed here (other parts of issue 9).
    assert teacher in ("refused", "accepted") and re.fullmatch(r"exit\d+|not_full", disk)
    assert "with space again -> exit 0, resumed, the stores agree" in out.stdout  # a full disk loses nothing
    (disk_line,) = [line for line in out.stdout.splitlines() if line.startswith("  disk: ")]
    expected = teacher == "refused" and disk == "exit2" and ", 1 stderr line(s)" in disk_line
    assert (out.returncode == 0) == expected  # the script's verdict: every round as issue 9 asks
