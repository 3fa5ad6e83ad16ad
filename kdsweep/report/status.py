"""`kdsweep status`: the studies in a store, how far each got, and whether a worker runs one now (issue 13).

Optuna's storage is the record of trials (states, epochs, owners); MLflow adds
where to look (experiment, parent run) and the budget the study last ran with
(a tag: it may grow on resume). Read-only: nothing is created, no trial is
recovered. A RUNNING trial counts as worked on now when its owner process is
alive on this machine; one whose owner is gone is stale (the next worker to
start recovers and retries it); an owner on another machine is reported as
such (its heartbeat decides, see workers.py).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from kdsweep.common.errors import UserError
from kdsweep.common.processes import Owner, heartbeat_settings
from kdsweep.common.uris import absolute_sqlite, redact
from kdsweep.study.best import best_trial
from kdsweep.study.budget import Budget, Spent
from kdsweep.study.optuna_storage import default_storage
from kdsweep.study.workers import stale_reason
from kdsweep.tracking.tracker import default_tracking_uri
from kdsweep.tracking.vocabulary import CONFIG_ATTR, OWNER_ATTR, PARENT_ATTR


def _sqlite_file(url: str) -> Path | None:
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def open_storage(url: str | None):
    """The Optuna storage to read; a local file must exist (a status never creates a store)."""
    url = absolute_sqlite(url or default_storage())
    path = _sqlite_file(url)
    if path is None:
        from kdsweep.study.optuna_storage import open_storage as open_any

        return open_any(url), url
    if not path.is_file():
        raise UserError(f"no Optuna storage at {url}: run `kdsweep study` first (or pass --storage)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.storages.RDBStorage(url), url
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot open Optuna storage {url}: {str(e).splitlines()[0][:200]}") from None


def _workers(running: list, grace: int) -> dict[str, Any]:
    """Who holds the RUNNING trials: live owners here, stale ones, owners on other machines."""
    live: dict[str, int] = {}
    hosts: dict[str, int] = {}  # host:pid of owners on other machines, judged by their heartbeat
    stale = elsewhere = 0
    for t in running:
        owner = Owner.from_attr(t.user_attrs.get(OWNER_ATTR))
        if stale_reason(t, locked=False, grace=grace):
            stale += 1
        elif owner is not None and owner.alive() is None:
            elsewhere += 1
            hosts[str(owner)] = hosts.get(str(owner), 0) + 1
        elif owner is not None:
            live[str(owner)] = live.get(str(owner), 0) + 1
        else:
            elsewhere += 1  # claimed moments ago, or by a worker that died before claiming: judged after the grace period
    return {"running_now": sorted(live), "running_trials": sum(live.values()), "stale_trials": stale,
            "other_machines": elsewhere, "working_elsewhere": sorted(hosts)}


def _study(storage, frozen, grace: int) -> dict[str, Any]:
    trials = storage.get_all_trials(frozen._study_id, deepcopy=False)
    states = {s.name: 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING,
                                  TrialState.WAITING)}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    spent = Spent.of(trials)
    best = best_trial(trials)
    fp = frozen.user_attrs.get(CONFIG_ATTR) or {}
    workers = _workers([t for t in trials if t.state == TrialState.RUNNING], grace)
    return {
        "study": frozen.study_name, "method": fp.get("method", ""),
        "per_trial": _per_trial(fp),
        "dataset": fp.get("dataset", ""), "teacher": fp.get("teacher", ""), "student": fp.get("student", ""),
        "seed": fp.get("seed"), "budget": {"trials": None, "epochs": None, "text": ""}, "per_trial_tag": "", "trials": states, "trained": spent.trials, "epochs_spent": spent.epochs,
        "best": None if best is None else {"trial": best.number, "val_acc": best.value,
                                           "test_acc": best.user_attrs.get("test_acc")},
        "active": workers["running_trials"] > 0, "workers": workers,
        "mlflow": {"parent_run": frozen.user_attrs.get(PARENT_ATTR, ""), "experiment": "", "experiment_id": ""},
    }


def _per_trial(fp: dict[str, Any]) -> dict[str, Any]:
    """What one trial computes, from the study's fingerprint; `momentum` is Adam's and AdamW's beta1 (loop.Schedule),
    and named so for them."""
    keys = ("optimizer", "epochs", "batch_size", "momentum", "weight_decay", "data_size", "val_fraction", "teacher_epochs",
            "preprocess")
    out = {k: fp[k] for k in keys if fp.get(k) is not None}
    if out.get("optimizer") in ("adam", "adamw") and "momentum" in out:
        out["beta1"] = out.pop("momentum")
    return out


def _add_mlflow(rows: list[dict], uri: str) -> str | None:
    """The experiment and budget tag of each study's parent run; a note when the store cannot be read."""
    path = _sqlite_file(uri)
    if path is not None and not path.is_file():
        return f"no MLflow store at {uri}: experiments and budgets unknown"
    from kdsweep.tracking.tracker import Tracker

    try:
        client = Tracker(uri).client
    except UserError as e:
        return str(e)
    for row in rows:
        run_id = row["mlflow"]["parent_run"]
        if not run_id:
            continue
        try:
            run = client.get_run(run_id)
        except Exception:  # noqa: BLE001 - deleted, or another store
            row["mlflow"]["parent_run"] += " (not in this MLflow store)"
            continue
        words = run.data.tags.get("kdsweep.budget", "")
        row["budget"] = {**Budget.read(words), "text": words}
        row["per_trial_tag"] = run.data.tags.get("kdsweep.per_trial", "")
        row["mlflow"]["experiment_id"] = run.info.experiment_id
        row["mlflow"]["experiment"] = client.get_experiment(run.info.experiment_id).name
    return None


def collect(storage_url: str | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    storage, url = open_storage(storage_url)
    _, grace = heartbeat_settings()
    rows = [_study(storage, s, grace) for s in sorted(storage.get_all_studies(), key=lambda s: s.study_name)]
    uri = absolute_sqlite(tracking_uri or default_tracking_uri())
    note = _add_mlflow(rows, uri) if rows else None
    return {"storage": redact(url), "tracking_uri": redact(uri), "studies": rows, "notes": [note] if note else []}


def _per_trial_words(row: dict) -> str:
    if row.get("per_trial_tag"):
        return row["per_trial_tag"]
    p = row["per_trial"]
    return f"{p['epochs']} epochs x batch {p['batch_size']}" if "epochs" in p and "batch_size" in p else "?"


def text(status: dict) -> str:
    rows = status["studies"]
    out = [f"{len(rows)} {'study' if len(rows) == 1 else 'studies'} in {status['storage']} "
           f"(MLflow: {status['tracking_uri']})"]
    for r in rows:
        s = r["trials"]
        w = r["workers"]
        out += ["", r["study"],
                f"  method {r['method'] or '?'}; per trial {_per_trial_words(r)}; budget {r['budget']['text'] or 'unrecorded'}",
                f"  trials: {s['COMPLETE']} complete, {s['PRUNED']} pruned, {s['FAIL']} failed, {s['RUNNING']} running"
                + (f", {s['WAITING']} waiting" if s["WAITING"] else "") + f" ({r['trained']} trained, {r['epochs_spent']} epochs)"]
        b = r["best"]
        if b:
            test = b["test_acc"]
            out.append(f"  best: trial {b['trial']}, val_acc {b['val_acc']:.4f}"
                       + (f", test_acc {test:.4f}" if isinstance(test, (int, float)) else ""))
        if w["running_now"]:
            out.append(f"  worker: running now ({', '.join(w['running_now'])}: {w['running_trials']} trial(s))")
        else:
            out.append("  worker: none running")
        if w["stale_trials"]:
            out.append(f"  {w['stale_trials']} trial(s) left RUNNING by a worker that is gone: the next start recovers them")
        if w["other_machines"]:
            where = (f" by {', '.join(w['working_elsewhere'])}" if w.get("working_elsewhere")
                     else " (another machine, or just claimed)")
            out.append(f"  {w['other_machines']} running trial(s) owned elsewhere{where}")
        m = r["mlflow"]
        if m["experiment"]:
            out.append(f"  MLflow: experiment {m['experiment']!r} (id {m['experiment_id']}), parent run {m['parent_run']}")
    out += [f"note: {n}" for n in status["notes"]]
    if not rows:
        out.append("no studies yet: `kdsweep study NAME` starts one")
    return "\n".join(out)


def as_json(status: dict) -> str:
    return json.dumps(status, indent=2, default=str)
