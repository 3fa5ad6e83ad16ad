"""One truth: a study's Optuna trials and its MLflow runs agree, and its MLflow parent run belongs to it.

Optuna decides the search (which trials are complete, which one is best);
MLflow holds what the report reads (curves, checkpoints, test metrics). Either
store can be deleted or replaced on its own (a removed mlruns/mlflow.db, a
recreated optuna.db), and then the report names a best trial the study never
chose, or a new study files its runs under an old study's parent. So every
start checks, under the study lock and before any trial:

  - the parent run is bound to this Optuna study (tags: its id and creation time);
  - each COMPLETE trial has its FINISHED run (the run id the trial recorded);
  - each trial run of the study belongs to a trial of this Optuna study, under this parent.

What disagrees is said in one line; the start is refused unless
`--on-mismatch repair` or `ignore` is given (see MODES).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import optuna

from kdsweep.common.errors import UserError
from kdsweep.study import outcome
from kdsweep.tracking.tracker import Tracker
from kdsweep.tracking.vocabulary import (
    EPOCHS_ATTR,
    PARENT_TAG,
    REASON_TAG,
    RUN_FINISHED,
    RUN_KILLED,
    RUN_RUNNING,
    STATE_ORPHANED,
    STATE_RUNNING,
    STATE_TAG,
)

MODES = ("refuse", "repair", "ignore")
CREATED_ATTR = "kdsweep.created"  # study user attr: when kdsweep first opened the study (ISO time)
NAME_ATTR = "kdsweep.requested_name"  # study user attr: the name asked for, before sanitising
STUDY_ID_TAG = "kdsweep.optuna_study_id"  # parent run tags: the Optuna study it belongs to
CREATED_TAG = "kdsweep.optuna_created"
STANDS_FOR_TAG = "kdsweep.stands_for"  # a run re-created by repair: the lost run id its trial still records
SHOWN = 5  # trial numbers named in a message

COMPLETE = optuna.trial.TrialState.COMPLETE


def is_orphaned(run: Any) -> bool:
    return run.data.tags.get(STATE_TAG) == STATE_ORPHANED


def identity(study: optuna.Study) -> dict[str, str]:
    """The tags binding a parent run to this Optuna study: its id and creation time (recorded on first use).

    The id alone is not enough: a recreated SQLite store numbers its first study 1 again.
    """
    created = study.user_attrs.get(CREATED_ATTR)
    if created is None:
        # A study from before this attribute: its first trial's start stands for its creation.
        starts = [t.datetime_start for t in study.get_trials(deepcopy=False) if t.datetime_start is not None]
        created = min(starts).isoformat() if starts else datetime.now(timezone.utc).isoformat()
        study.set_user_attr(CREATED_ATTR, created)
    return {STUDY_ID_TAG: str(study._study_id), CREATED_TAG: created}


def check_name(study: optuna.Study, requested: str, stored: str) -> None:
    """Refuse a study that was created for another name which sanitised to the same stored name."""
    old = study.user_attrs.get(NAME_ATTR)
    if old is None:
        study.set_user_attr(NAME_ATTR, requested)
    elif old != requested:
        raise UserError(f"study {stored!r} belongs to the name {old!r}, not {requested!r}; choose another --study-name")


def find_parent(tracker: Tracker, exp: str, name: str, recorded: str | None) -> str | None:
    """The study's parent run: the one the Optuna study recorded if MLflow still has it, else one tagged with the name."""
    if recorded:
        try:
            if not is_orphaned(tracker.client.get_run(recorded)):
                return recorded
        except Exception:  # noqa: BLE001 - gone with a deleted or replaced store
            pass
    runs = tracker.find_runs(exp, {"kdsweep.role": "study", "kdsweep.study": name})
    return next((r.info.run_id for r in runs if not is_orphaned(r)), None)


def _numbers(items, number: Callable[[Any], int]) -> str:
    ns = sorted({number(i) for i in items})
    return ", ".join(map(str, ns[:SHOWN])) + (", ..." if len(ns) > SHOWN else "")


def _describe(bound: dict[str, str | None], me: dict[str, str]) -> str:
    """'created T1; this one: T2' (to the second), with the study ids when they differ too."""
    def one(i: dict) -> str:
        created = (i[CREATED_TAG] or "?")[:19]
        return created if i[STUDY_ID_TAG] == me[STUDY_ID_TAG] else f"id {i[STUDY_ID_TAG]}, {created}"
    return f"created {one(bound)}; this one: {one(me)}"


def _trial_number(run: Any) -> int:
    try:
        return int(run.data.tags.get("kdsweep.trial", ""))
    except ValueError:
        return -1


@dataclass
class Disagreement:
    """What Optuna and MLflow disagree on for one study (empty: they agree)."""

    name: str
    parent: str | None  # the parent run found in MLflow
    foreign: str = ""  # why that parent belongs to another Optuna study ("" if it does not)
    missing: list = field(default_factory=list)  # COMPLETE trials (FrozenTrial) without their FINISHED run
    orphans: list = field(default_factory=list)  # trial runs (mlflow Run) without their trial in this study
    misfiled: list = field(default_factory=list)  # runs of this study's trials under another parent (or a foreign one)

    def __bool__(self) -> bool:
        return bool(self.foreign or self.missing or self.orphans or self.misfiled)

    def line(self) -> str:
        parts = [self.foreign] if self.foreign else []
        if self.missing:
            parts.append(f"{len(self.missing)} complete Optuna trial(s) without a FINISHED MLflow run "
                         f"({_numbers(self.missing, lambda t: t.number)})")
        if self.orphans:
            parts.append(f"{len(self.orphans)} MLflow trial run(s) without their Optuna trial "
                         f"(trial {_numbers(self.orphans, _trial_number)})")
        if self.misfiled and not self.foreign:
            parts.append(f"{len(self.misfiled)} trial run(s) filed under another parent run "
                         f"(trial {_numbers(self.misfiled, _trial_number)})")
        return f"Optuna and MLflow disagree on study {self.name!r}: " + "; ".join(parts)

    def hint(self) -> str:
        store = "Optuna" if self.foreign or self.orphans else "MLflow"
        return (f"was the {store} store deleted or replaced? Use --on-mismatch repair (see kdsweep study --help) "
                f"or ignore to resume, or --study-name NEW for a new study")


def check(tracker: Tracker, exp: str, study: optuna.Study, name: str, parent: str | None, recorded_parent: str | None,
          run_id_attr: str) -> Disagreement:
    """Compare the study's trials in Optuna with its runs in MLflow (call under the study lock)."""
    d = Disagreement(name, parent)
    me = identity(study)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    owned = []
    for r in tracker.find_runs(exp, {"kdsweep.role": "trial", "kdsweep.study": name}):
        if is_orphaned(r):
            continue
        trial = trials.get(_trial_number(r))
        recorded = trial.user_attrs.get(run_id_attr) if trial is not None else None
        mine = r.data.tags.get(STANDS_FOR_TAG, r.info.run_id)
        # A trial killed between opening its run and recording the run id holds none: its run is still its own.
        if trial is not None and (recorded == mine or (recorded is None and trial.state != COMPLETE)):
            owned.append(r)
        else:
            d.orphans.append(r)
    if parent is not None:
        tags = tracker.client.get_run(parent).data.tags
        bound = {k: tags.get(k) for k in me}
        if any(bound.values()):
            if bound != me:
                d.foreign = f"parent run {parent} belongs to another Optuna study ({_describe(bound, me)})"
        elif recorded_parent != parent and any(r.data.tags.get(PARENT_TAG) == parent for r in d.orphans):
            # A parent from before binding existed, holding runs of trials this study does not have.
            d.foreign = f"parent run {parent} was made for another Optuna study"
    # Runs of this study's trials that cannot stay where they are: under a parent of another study, or none.
    d.misfiled = [r for r in owned if d.foreign or r.data.tags.get(PARENT_TAG) != parent]
    # A RUNNING run of a COMPLETE trial, or one closed as interrupted, is ended FINISHED by the reconciliation that follows.
    has_run = {_trial_number(r) for r in owned if r.info.status in (RUN_FINISHED, RUN_RUNNING) or outcome.closed_as_interrupted(r)}
    d.missing = sorted((t for t in trials.values() if t.state == COMPLETE and t.number not in has_run), key=lambda t: t.number)
    return d


def settle(tracker: Tracker, d: Disagreement, mode: str, say: Callable[[str], None]) -> str | None:
    """Refuse, or retire what no trial owns (repair), or go on (ignore); return the parent run to keep (None: a new one)."""
    if not d:
        return d.parent
    if mode == "refuse":
        raise UserError(f"{d.line()}; {d.hint()}")
    if mode == "ignore":
        say(f"warning: {d.line()}; going on as asked (--on-mismatch ignore): "
            f"the report reads MLflow and may disagree with Optuna")
        return d.parent
    why = "no trial of this Optuna study owns it (retired by --on-mismatch repair)"
    for r in d.orphans:  # trial runs without their trial: ended through the outcome table
        outcome.end_trial(outcome.Records(tracker, r.info.run_id), outcome.ORPHANED, outcome.Ending(reason=why))
    if d.foreign:  # the parent run of another study
        tracker.close(d.parent, RUN_KILLED, {STATE_TAG: STATE_ORPHANED, REASON_TAG: d.foreign})
        return None
    return d.parent


def restore(tracker: Tracker, exp: str, parent: str, d: Disagreement, method: str, params: dict[str, Any],
            run_id_attr: str, say: Callable[[str], None]) -> None:
    """After a repair: runs of this study's trials moved under `parent`, and a stand-in run from Optuna's
    record for each complete trial whose run is gone; say what was done.

    Optuna keeps a trial's parameters, validation accuracy and test accuracy, not its curves or
    checkpoint: the stand-in carries what is known (tag kdsweep.restored) so that the report names
    the study's real best trial, and says its checkpoint is missing.
    """
    for r in d.misfiled:
        tracker.log(r.info.run_id, tags={PARENT_TAG: parent})
    for t in d.missing:
        tags = {"kdsweep.role": "trial", "kdsweep.method": method, "kdsweep.study": d.name, "kdsweep.trial": t.number,
                STATE_TAG: STATE_RUNNING, "kdsweep.restored": "from Optuna's record: no curves, no checkpoint",
                STANDS_FOR_TAG: t.user_attrs.get(run_id_attr, "")}
        run = tracker.start(exp, f"t{t.number:03d}", tags, parent=parent)
        metrics = {"best_val_acc": t.value}
        metrics.update({k: t.user_attrs[k] for k in ("test_acc", "best_epoch") if isinstance(t.user_attrs.get(k), (int, float))})
        tracker.log(run, metrics, params={**params, **t.params})
        outcome.end_trial(outcome.Records(tracker, run), outcome.COMPLETE,
                          outcome.Ending(epochs=t.user_attrs.get(EPOCHS_ATTR)))
    done = [f"{len(d.orphans)} MLflow run(s) without their trial marked {STATE_ORPHANED}"] if d.orphans else []
    if d.foreign:
        done.append(f"parent run {d.parent} marked {STATE_ORPHANED}, new parent {parent}")
    if d.misfiled:
        done.append(f"{len(d.misfiled)} run(s) of its trials moved under parent {parent}")
    if d.missing:
        done.append(f"{len(d.missing)} run(s) re-created from Optuna's record (no curves, no checkpoint)")
    say(f"repaired study {d.name!r}: " + "; ".join(done))


def bind(tracker: Tracker, parent: str, study: optuna.Study) -> None:
    tracker.log(parent, tags=identity(study))
