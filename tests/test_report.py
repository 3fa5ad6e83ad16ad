"""`kdsweep report` and `kdsweep confirm` end to end on a tiny digits sweep (ce + vanilla_kd)."""

import json
import math

import pandas as pd
import pytest

from kdsweep import cli

pytestmark = pytest.mark.filterwarnings("ignore")

# Small and fast: 300 training images, 1-epoch teacher, 1-epoch trials.
DATA = ["--dataset", "digits", "--data-size", "300", "--device", "cpu"]


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri, role):
    c = _client(uri)
    exp = c.get_experiment_by_name("kdsweep/digits/digitnet_l->digitnet_s")
    return c.search_runs([exp.experiment_id], f"tags.`kdsweep.role` = '{role}'", max_results=1000)


def _make_store(root, mp, methods=("ce", "vanilla_kd"), trials=2, epochs=1) -> str:
    """Studies of `methods` on a new store in `root`; its tracking URI."""
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    storage = f"sqlite:///{root / 'optuna.db'}"
    (root / "mlruns").mkdir()
    mp.chdir(root)
    mp.setenv("KDSWEEP_CACHE", str(root / "cache"))
    for method in methods:
        rc = cli.main(["study", method, *DATA, "--trials", str(trials), "--epochs", str(epochs), "--teacher-epochs", "1",
                       "--pruner", "none", "--storage", storage, "--tracking-uri", uri])
        assert rc == 0
    return uri


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two studies on one store: ce and vanilla_kd, 2 trials of 1 epoch each."""
    root = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        uri = _make_store(root, mp)
        yield root, uri, mp


def test_report_writes_four_tables_per_format(sweep, capsys):
    root, uri, _ = sweep
    out = root / "R"
    rc = cli.main(["report", "--tracking-uri", uri, "--format", "md,csv,json,tex,html", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "## Ranking by test accuracy" in printed and "## Ranks per metric" in printed
    assert "| vanilla_kd" in printed and "| teacher" in printed
    assert "no CI and no p-values" in printed  # one run per method: nothing to test yet, and it says so
    assert "charged its whole group's time" not in printed  # each trial trained alone: its seconds are its own
    for table in ("best", "metrics", "ranking", "ranks"):
        for ext in ("md", "csv", "json", "tex", "html"):
            assert (out / f"{table}.{ext}").stat().st_size > 0

    best = pd.read_csv(out / "best.csv")
    assert best["label"].tolist()[0] == "teacher"
    assert sorted(best["label"]) == ["ce", "teacher", "vanilla_kd"]
    for col in ("method", "best_val_acc", "test_acc", "params", "complete", "pruned", "failed", "train_seconds_best",
                "epochs_all", "train_seconds_all", "budget", "per_trial", "at_range_edge"):
        assert col in best.columns
    methods = best.set_index("label")
    assert methods.loc["ce", "complete"] == 2 and methods.loc["vanilla_kd", "complete"] == 2
    # What each study cost: all its trials' epochs and seconds, and the budget it ran with.
    assert methods.loc["ce", "epochs_all"] == 2 and methods.loc["ce", "budget"] == "2 trials"
    assert methods.loc["ce", "per_trial"] == "e1-b32-n300-te1"
    for m in ("ce", "vanilla_kd"):
        secs = [r.data.metrics["train_seconds"] for r in _runs(uri, "trial") if r.data.tags["kdsweep.method"] == m]
        assert len(secs) == 2 and methods.loc[m, "train_seconds_all"] == pytest.approx(sum(secs))
    assert "temperature=" in methods.loc["vanilla_kd", "params"] and "alpha=" in methods.loc["vanilla_kd", "params"]
    assert methods.loc["ce", "params"].startswith("lr=")

    # The best trial's test accuracy as the study logged it == the report's re-evaluation of its checkpoint.
    met = pd.read_csv(out / "metrics.csv").set_index("label")
    for label in ("ce", "vanilla_kd"):
        assert met.loc[label, "acc"] == pytest.approx(methods.loc[label, "test_acc"], abs=1e-6)
        assert 0 <= met.loc[label, "ece"] <= 1 and 0 <= met.loc[label, "agree_t"] <= 1
        assert met.loc[label, "kl_t_s"] >= 0 and met.loc[label, "n"] == 1
    assert math.isnan(met.loc["teacher", "agree_t"])
    assert met.loc["teacher", "params"] > met.loc["ce", "params"] and met.loc["teacher", "macs"] > met.loc["ce", "macs"]

    ranking = json.loads((out / "ranking.json").read_text())
    by = {r["label"]: r for r in ranking}
    assert set(by) == {"ce", "vanilla_kd"}
    assert by["ce"]["delta_acc_vs_ce"] == 0.0 and by["vanilla_kd"]["p_vs_ce_holm"] is None
    assert by["vanilla_kd"]["delta_acc_vs_ce"] == pytest.approx(met.loc["vanilla_kd", "acc"] - met.loc["ce", "acc"])
    ranks = json.loads((out / "ranks.json").read_text())
    assert sorted(r["acc_rank"] for r in ranks) in ([1, 2], [1, 1])

    # Plots as files and as artifacts of the MLflow report run.
    pngs = {p.name for p in (out / "plots").glob("*.png")}
    assert {"test_acc.png", "val_curves.png", "history_ce.png", "history_vanilla_kd.png"} <= pngs
    assert (out / "plots" / "test_acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = _runs(uri, "report")
    assert len(rep) == 1
    logged = {a.path for a in _client(uri).list_artifacts(rep[0].info.run_id, "report/plots")}
    assert "report/plots/test_acc.png" in logged
    assert "report/best.csv" in {a.path for a in _client(uri).list_artifacts(rep[0].info.run_id, "report")}


def test_confirm_adds_runs_then_reuses_them(sweep, capsys):
    root, uri, _ = sweep
    assert cli.main(["confirm", "--tracking-uri", uri, "--seeds", "2", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines() == ["ce: 0 reused, 2 trained, 0 failed",
                                                    "vanilla_kd: 0 reused, 2 trained, 0 failed"]
    runs = _runs(uri, "confirm")
    assert len(runs) == 4
    assert sorted((r.data.tags["kdsweep.method"], r.data.tags["kdsweep.confirm_seed"]) for r in runs) == \
        [("ce", "1"), ("ce", "2"), ("vanilla_kd", "1"), ("vanilla_kd", "2")]
    parents = {r.data.tags["kdsweep.study"]: r.info.run_id for r in _runs(uri, "study")}
    for r in runs:  # child runs of their study, with the best trial's hyperparameters
        assert r.data.tags["mlflow.parentRunId"] == parents[r.data.tags["kdsweep.study"]]
        assert r.data.tags["kdsweep.state"] == "COMPLETE" and "test_acc" in r.data.metrics
    src = _client(uri).get_run(runs[0].data.tags["kdsweep.source_run"])
    assert runs[0].data.params["lr"] == src.data.params["lr"]
    kd = [r for r in runs if r.data.tags["kdsweep.method"] == "vanilla_kd"]
    assert kd[0].data.metrics["test_acc"] != kd[1].data.metrics["test_acc"] or \
        kd[0].data.metrics["best_val_acc"] != kd[1].data.metrics["best_val_acc"]  # fresh seeds differ

    # Twice: everything reused, nothing trained; --quiet: the table only.
    assert cli.main(["confirm", "--tracking-uri", uri, "--seeds", "2", "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr()
    assert printed.out.splitlines() == ["ce: 2 reused, 0 trained, 0 failed", "vanilla_kd: 2 reused, 0 trained, 0 failed"]
    assert "already there" not in printed.err, printed.err
    assert len(_runs(uri, "confirm")) == 4

    out = root / "R2"
    assert cli.main(["report", "--tracking-uri", uri, "--format", "csv", "--out", str(out), "--no-plots", "--no-log"]) == 0
    printed = capsys.readouterr().out
    assert " ± " in printed and "no p-values: they need at least 3 confirmation seeds" in printed
    met = pd.read_csv(out / "metrics.csv").set_index("label")
    accs = {m: sorted(r.data.metrics["test_acc"] for r in runs if r.data.tags["kdsweep.method"] == m) for m in ("ce", "vanilla_kd")}
    for m, a in accs.items():
        assert met.loc[m, "n"] == 2
        assert met.loc[m, "acc"] == pytest.approx(sum(a) / 2, abs=1e-6)
        assert met.loc[m, "acc_std"] == pytest.approx(abs(a[1] - a[0]) / math.sqrt(2), abs=1e-6)
    ranking = pd.read_csv(out / "ranking.csv").set_index("label")
    assert ranking["p_vs_ce_holm"].isna().all() and ranking["top_group"].isna().all()
    assert ranking["acc"].is_monotonic_decreasing  # sorted by the mean
    assert (ranking["ci95_low"] < ranking["acc"]).all()  # n = 2: a CI (a wide one), but no test

    # A third seed: now every method can be tested, with Holm's correction (one comparison here: raw == Holm).
    assert cli.main(["report", "--tracking-uri", uri, "--seeds", "3", "--format", "csv", "--out", str(out), "--no-plots",
                     "--no-log", "--device", "cpu"]) == 0
    assert "Holm-corrected" in capsys.readouterr().out
    runs = _runs(uri, "confirm")
    accs = {m: [r.data.metrics["test_acc"] for r in runs if r.data.tags["kdsweep.method"] == m] for m in ("ce", "vanilla_kd")}
    ranking = pd.read_csv(out / "ranking.csv").set_index("label")
    from kdsweep.report.metrics import welch_p

    assert len(accs["ce"]) == 3 and ranking.loc["vanilla_kd", "n"] == 3
    assert ranking.loc["vanilla_kd", "p_vs_ce_holm"] == pytest.approx(welch_p(accs["vanilla_kd"], accs["ce"]), rel=1e-5)
    assert ranking.loc[ranking["acc"].idxmax(), "top_group"]


def test_confirm_trains_each_seed_of_every_method_together_as_each_would_alone(tmp_path, monkeypatch, capsys):
    """Seed k of every study trains in one lockstep group; each seed's run equals the same seed trained alone
    (the same sweep on a second store, confirmed one study only)."""
    curves = {}
    for which, studies in (("together", []), ("alone", ["--studies", "vanilla_kd"])):
        (tmp_path / which).mkdir()
        uri = _make_store(tmp_path / which, monkeypatch, trials=1, epochs=2)
        assert cli.main(["confirm", "--tracking-uri", uri, "--seeds", "2", "--device", "cpu", *studies]) == 0
        runs = [r for r in _runs(uri, "confirm") if r.data.tags["kdsweep.method"] == "vanilla_kd"]
        curves[which] = {r.data.tags["kdsweep.confirm_seed"]: (
            [m.value for m in _client(uri).get_metric_history(r.info.run_id, "train_loss")],
            r.data.metrics["best_val_acc"], r.data.metrics["test_acc"]) for r in runs}
    assert capsys.readouterr().out.count("2 trained") == 3  # ce and vanilla_kd together; vanilla_kd alone
    assert sorted(curves["together"]) == sorted(curves["alone"]) == ["1", "2"]
    for seed, (losses, val, test) in curves["together"].items():
        a_losses, a_val, a_test = curves["alone"][seed]
        assert losses == pytest.approx(a_losses, rel=1e-5) and val == pytest.approx(a_val) and test == pytest.approx(a_test)


def test_confirm_workers_split_each_seed_into_the_same_blocks_whoever_claims_first(monkeypatch):
    """With --processes 2 each seed's studies are cut into two fixed blocks, and a worker claims a block by its first
    study: when a fellow has claimed only that first study so far, this worker takes the other block whole, never
    the rest of the fellow's (claimed one by one, the two workers' groups mixed, and with them a seed's rounding)."""
    from collections import Counter
    from types import SimpleNamespace

    from kdsweep.report import confirm as cf

    monkeypatch.setattr(cf, "processes_here", lambda: 2)
    monkeypatch.setattr(cf, "StudyLock", lambda *a, **k: SimpleNamespace(close=lambda: None))
    fellows_so_far = {("m0", 1)}  # the fellow has claimed seed 1's first study, and no other yet

    def claim_seed(sel, study, k, lock, say):
        return (cf._FELLOW if (study.name, k) in fellows_so_far else cf._MINE), f"run-{study.name}-{k}"

    def prepare(sel, p, k, run, accel):
        return SimpleNamespace(plan=p, seed=k, member=SimpleNamespace(schedule=SimpleNamespace(epochs=1, batch_size=1)))

    trained = []
    monkeypatch.setattr(cf, "_claim_seed", claim_seed)
    monkeypatch.setattr(cf, "_prepare", prepare)
    monkeypatch.setattr(cf, "_train_group", lambda sel, seeds, *a: trained.append((seeds[0].seed, [s.plan.study.name for s in seeds])))
    monkeypatch.setattr(cf, "_await_fellows", lambda *a: None)
    plans = [SimpleNamespace(study=SimpleNamespace(name=f"m{j}"), seeds=[1, 2], data=None, counts=Counter()) for j in range(5)]
    cf._train_seeds(SimpleNamespace(tracker=SimpleNamespace(uri="sqlite:///unused")), plans, None, cf._Says(print, print), None)
    blocks = (["m0", "m1", "m2"], ["m3", "m4"])
    # first pass: one block a seed (seed 1's second, as the fellow holds the first's head); then what is left
    assert trained == [(1, blocks[1]), (2, blocks[0]), (1, ["m1", "m2"]), (2, blocks[1])]


def test_study_without_complete_trial_and_missing_teacher(sweep, capsys):
    root, uri, mp = sweep
    c = _client(uri)
    # A study that has not completed a trial yet: a parent run with no COMPLETE child.
    parent = _runs(uri, "study")[0]
    name = "slow_kd-digits-digitnet_l-digitnet_s-s0"
    run = c.create_run(parent.info.experiment_id, run_name=name,
                       tags={"kdsweep.role": "study", "kdsweep.study": name, "kdsweep.method": "vanilla_kd",
                             "kdsweep.per_trial": parent.data.tags["kdsweep.per_trial"]})
    for k, v in parent.data.params.items():
        c.log_param(run.info.run_id, k, v)
    # The teacher not in the cache (as on another machine than the study's): the `teachers` run's artifact serves.
    moved = [p.rename(p.with_suffix(".moved")) for p in (root / "cache" / "teachers").glob("*.pt")]
    texp = c.get_experiment_by_name("teachers")
    deleted = []
    try:
        from kdsweep.report.stored_studies import load_teacher, open_tracker, select

        got, payload, where = load_teacher(select(open_tracker(uri)), root / "dl", print, (1, 8, 8), 10)
        assert got is not None and payload.get("arch") == "digitnet_l" and "teachers" in where
        # ... and with that run deleted, the teacher is nowhere.
        for r in c.search_runs([texp.experiment_id]):
            c.delete_run(r.info.run_id)
            deleted.append(r.info.run_id)

        out = root / "R3"
        assert cli.main(["report", "--tracking-uri", uri, "--format", "csv", "--out", str(out), "--no-plots", "--no-log"]) == 0
        captured = capsys.readouterr()
    finally:  # the store and cache are the module's: leave them as found for the tests after this one
        for p in moved:
            p.rename(p.with_suffix(".pt"))
        for r in deleted:
            c.restore_run(r)
        c.delete_run(run.info.run_id)
    assert "teacher missing" in captured.err
    best = pd.read_csv(out / "best.csv").set_index("label")
    assert best.loc["slow_kd", "status"] == "no complete trial" and math.isnan(best.loc["slow_kd", "test_acc"])
    assert best.loc["teacher", "status"] == "teacher checkpoint missing"
    ranks = pd.read_csv(out / "ranks.csv").set_index("label")
    assert math.isnan(ranks.loc["slow_kd", "avg_rank"]) and not math.isnan(ranks.loc["ce", "avg_rank"])
    assert ranks["agree_t_rank"].isna().all()  # no teacher: no comparison, no rank


def test_report_on_empty_store_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdsweep: error: no MLflow store")
    assert not (tmp_path / "mlruns").exists()  # reading never creates a store
    assert cli.main(["confirm"]) == 2


def test_report_on_store_without_studies_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from kdsweep.tracking.tracker import Tracker

    monkeypatch.chdir(tmp_path)
    Tracker(None)  # an MLflow store with no kdsweep experiment in it
    assert cli.main(["report", "--dataset", "digits"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no kdsweep studies" in err[0]


def test_a_lost_best_checkpoint_falls_back_to_the_next_best_trial(sweep, capsys, monkeypatch):
    """Attack: the best trial's checkpoint is gone; the method used to vanish from the ranking (ce: rank 1 on all)."""
    from kdsweep.report import build

    root, uri, _ = sweep
    from kdsweep.report.stored_studies import open_tracker, select

    sel = select(open_tracker(uri))
    for s in sel.studies:
        s.confirms = []  # the tuning trials, as before any `confirm` (an earlier test of this module confirmed)
    kd = next(s for s in sel.studies if s.label == "vanilla_kd")
    lost = kd.best.info.run_id
    real = build.download
    monkeypatch.setattr(build, "download", lambda t, run, path, dst: None if run == lost else real(t, run, path, dst))
    rep = build.build(sel, device="cpu", say=print, latency=False)
    said = capsys.readouterr().out
    assert "has no checkpoint/student.pt artifact; evaluating trial" in said
    met = rep.tables["metrics"].set_index("label")
    other = next(r for r in kd.trials if r.info.run_id != lost)
    assert met.loc["vanilla_kd", "n"] == 1
    assert met.loc["vanilla_kd", "acc"] == pytest.approx(other.data.metrics["test_acc"], abs=1e-6)


def test_search_ranges_are_logged_as_data_and_older_stores_still_read():
    # Issue 19: the range was logged as the text "[1, 20] log" and parsed back with a regex.
    from types import SimpleNamespace

    from kdsweep.common.space import Float
    from kdsweep.report.stored_studies import StudyRuns

    r = Float(0.5, 20.0, 4.0, log=True)
    assert json.loads(r.to_param()) == {"low": 0.5, "high": 20.0, "log": True}
    assert Float.from_param(r.to_param()) == Float(0.5, 20.0, 0.5, log=True)  # the default is not logged
    assert Float.from_param("[1, 20] log") == Float(1.0, 20.0, 1.0, log=True)  # older stores
    assert Float.from_param("[0, 1]") == Float(0.0, 1.0, 0.0)
    for bad in ("", "[1, x]", "1, 20", "[1, 20] lin", '{"low": 1}', "null"):
        assert Float.from_param(bad) is None, bad
    params = {"space.temperature": r.to_param(), "space.alpha": "[0, 1]", "space.beta": "?"}
    s = StudyRuns(run=SimpleNamespace(data=SimpleNamespace(params=params, tags={})), trials=[], confirms=[])
    assert s.space() == {"temperature": Float(0.5, 20.0, 0.5, log=True), "alpha": Float(0.0, 1.0, 0.0)}


def test_the_best_trial_is_decided_in_one_place():
    # Issue 19: Optuna's best_trial decided the study's summary, store.best_trial the report's, status a third max().
    import re
    from pathlib import Path
    from types import SimpleNamespace as NS

    from kdsweep.study.best import best_run, best_trial, ranked_runs

    trials = [NS(number=n, value=v, state=NS(name=s)) for n, v, s in
              [(0, 0.5, "COMPLETE"), (1, 0.9, "PRUNED"), (2, 0.7, "COMPLETE"), (3, 0.7, "COMPLETE"), (4, None, "FAIL")]]
    assert best_trial(trials).number == 2 and best_trial(trials[4:]) is None  # a tie goes to the earliest trial
    runs = [NS(data=NS(tags={"kdsweep.state": "PRUNED" if t.state.name == "PRUNED" else t.state.name,
                             "kdsweep.trial": str(t.number)}, metrics={} if t.value is None else {"best_val_acc": t.value}))
            for t in reversed(trials)]
    assert best_run(runs).data.tags["kdsweep.trial"] == "2"  # the same trial, read from MLflow
    assert [r.data.tags["kdsweep.trial"] for r in ranked_runs(runs)] == ["2", "3", "0"]
    package = Path(__file__).resolve().parents[1] / "kdsweep"
    others = [str(p.relative_to(package)) for p in package.rglob("*.py") if p.name != "best.py"
              and re.search(r"\.best_(trial|value)\b|best_val_acc.\]\s*,\s*-", p.read_text())]
    assert not others, f"these decide the best trial themselves: {others}"


def test_the_cost_column_says_when_trials_were_charged_their_groups_time():
    """In a lockstep group a trial's seconds are its group's: the best table's caption says so, and only then."""
    from types import SimpleNamespace

    from kdsweep.report.build import trained_in_groups

    def study(parallel):
        return SimpleNamespace(params={} if parallel is None else {"parallel": parallel})

    assert not trained_in_groups([study(None), study("1")])  # older stores logged no `parallel`
    assert trained_in_groups([study("1"), study("16")])
