"""Confirmation runs: retrain each method's best config with fresh seeds.

One tuned trial per method cannot separate methods half a point apart: its
score is one draw of the initialisation and batch order, and the best of
several trials is biased upward. A confirmation run trains the best trial's
hyperparameters again, on the same split and with the same teacher, but with
a fresh seed for the student's initialisation and the augmentation stream.

Each run is an MLflow child run of the study's parent run, tagged
kdsweep.role=confirm, kdsweep.confirm_seed, kdsweep.source_run (the trial
whose config it retrains) and kdsweep.state. A COMPLETE run for the same
(study, source trial, seed) is reused, so the command is resumable and cheap
to repeat; if the study grows and its best trial changes, the new best config
gets its own runs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from kdsweep.common import atomic
from kdsweep.common.errors import UserError
from kdsweep.common.locks import StudyLock
from kdsweep.data.dispatch import get_dataset
from kdsweep.methods.registry import get_method
from kdsweep.models import taps
from kdsweep.models.factory import build_model
from kdsweep.models.zoo import count_params
from kdsweep.report.stored_studies import (
    Say,
    Selection,
    StudyRuns,
    confirm_seeds,
    data_key,
    load_teacher,
    split_data,
)
from kdsweep.study import outcome
from kdsweep.study.trial import record_result
from kdsweep.tracking import cleanup
from kdsweep.tracking.tracker import Curves
from kdsweep.tracking.vocabulary import RUN_FINISHED, RUN_RUNNING, STATE_COMPLETE, STATE_RUNNING, STATE_TAG
from kdsweep.training.devices import set_cpu_threads
from kdsweep.training.loop import Schedule, train_student


def _existing(study: StudyRuns) -> dict[str, str]:
    """confirm_seed -> run id of the COMPLETE confirmation runs of the study's current best trial."""
    return {r.data.tags["kdsweep.confirm_seed"]: r.info.run_id for r in study.confirms}


def confirm(sel: Selection, seeds: int = 3, device: torch.device | str = "cpu", data_dir: str | None = None,
            say: Say = print) -> dict[str, dict[str, int]]:
    """Bring every selected study to `seeds` COMPLETE confirmation runs; return {label: {reused, trained, failed}}."""
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    device = torch.device(device)
    if device.type == "cpu":  # as the study's trials trained
        set_cpu_threads(default=get_dataset(sel.dataset).cpu_threads)
    wanted = confirm_seeds(sel.seed, seeds)
    summary: dict[str, dict[str, int]] = {}
    todo = [s for s in sel.studies if s.best is not None]
    for s in sel.studies:
        if s.best is None:
            say(f"{s.label}: no complete trial, nothing to confirm")
    if not todo:
        return summary

    cleanup.close_dead_runs(sel.tracker, sel.experiment_id, ("confirm",), say,
                            close=lambda run, reason: _close_dead(sel.tracker, run, reason))
    datas: dict[tuple, object] = {}
    teacher = t_where = None
    with atomic.tmp_dir("kdsweep-confirm") as tmp:
        for s in todo:
            have = _existing(s)
            missing = [k for k in wanted if str(k) not in have]
            summary[s.label] = {"reused": len(wanted) - len(missing), "trained": 0, "failed": 0}
            if not missing:
                say(f"{s.label}: {len(wanted)} confirmation runs already there (seeds {', '.join(map(str, wanted))}); reused")
                continue
            try:
                method_cls = get_method(s.method)
            except UserError as e:
                say(f"{s.label}: {e}; skipped")
                continue
            key = data_key(s.params)
            if key not in datas:  # the split the study trained on (normally shared by all)
                datas[key] = split_data(s.params, data_dir, device)
            data = datas[key]
            t_shapes = None
            if method_cls.uses_teacher:
                if teacher is None:
                    teacher, _, t_where = load_teacher(sel, Path(tmp), say, data.in_shape, data.num_classes,
                                                       **taps.recorded_paths(s.params, "teacher"))
                    if teacher is not None:
                        teacher.to(device).eval().requires_grad_(False)
                if teacher is None:
                    say(f"{s.label}: teacher missing ({t_where}); skipped")
                    continue
                t_shapes = teacher.shapes(data.in_shape)
            say(f"{s.label}: {summary[s.label]['reused']} confirmation runs reused, training seeds {', '.join(map(str, missing))}")
            _train_seeds(sel, s, missing, (method_cls, teacher if method_cls.uses_teacher else None, t_shapes, data),
                         summary[s.label], say)
    return summary


def _train_seeds(sel: Selection, s: StudyRuns, seeds: list[int], setup: tuple, counts: dict[str, int], say: Say) -> None:
    """Claim and train each seed of `seeds` that no other confirm has taken meanwhile; count what happened."""
    lock = StudyLock(sel.tracker.uri, f"confirm:{s.name}")
    try:
        for k in seeds:
            run = _claim_seed(sel, s, k, lock, say)
            if run is None:
                counts["reused"] += 1
                continue
            counts["trained" if _train_one(sel, s, *setup, k, run, say) else "failed"] += 1
    finally:
        lock.close()


def _seed_runs(sel: Selection, s: StudyRuns, seed: int | None, statuses: tuple[str, ...]) -> list:
    """The confirmation runs of `s`'s current best trial (of one seed, unless None) in one of `statuses`."""
    tags = {"kdsweep.role": "confirm", "kdsweep.study": s.name, "kdsweep.source_run": s.best.info.run_id}
    if seed is not None:
        tags["kdsweep.confirm_seed"] = str(seed)
    return sel.tracker.find_runs(sel.experiment_id, tags, statuses=statuses)


def _claim_seed(sel: Selection, s: StudyRuns, seed: int, lock: StudyLock, say: Say) -> str | None:
    """Start seed `seed`'s run (its claim), unless another confirm trains or trained it since this one looked.

    Under the lock, so two `confirm`s at once share the seeds instead of both training each (the lock is
    released while a seed trains; on a store without one, claims can race, as a study's trials can)."""
    with lock:
        for run in _seed_runs(sel, s, seed, (RUN_RUNNING, RUN_FINISHED)):
            if run.info.status == RUN_FINISHED and run.data.tags.get(STATE_TAG) == STATE_COMPLETE:
                say(f"  seed {seed}: trained meanwhile by another confirm (run {run.info.run_id}); reused")
                return None
            owner = cleanup.run_owner(run)
            if run.info.status == RUN_RUNNING and owner is not None and owner.alive() is not False:
                say(f"  seed {seed}: being trained by {owner} (run {run.info.run_id}); left to it")
                return None
        best = s.best
        return sel.tracker.start(sel.experiment_id, f"confirm-s{seed}",  # under the study's parent run, which names it
                                 {"kdsweep.role": "confirm", "kdsweep.study": s.name, "kdsweep.method": s.method,
                                  "kdsweep.confirm_seed": seed, "kdsweep.source_run": best.info.run_id,
                                  "kdsweep.source_trial": best.data.tags.get("kdsweep.trial", ""),
                                  STATE_TAG: STATE_RUNNING, **cleanup.owner_tags()},
                                 parent=s.run.info.run_id)


def lost_seeds(sel: Selection, close: bool) -> list[str]:
    """One line per confirmation seed whose process died while it trained (its run left RUNNING on this node),
    for `confirm` and `report` to say; with `close`, each such run is ended as a lost worker's trial is."""
    lines = []
    for s in sel.studies:
        if s.best is None:
            continue
        for run in _seed_runs(sel, s, None, (RUN_RUNNING,)):
            owner = cleanup.run_owner(run)
            if owner is None or owner.alive() is not False:
                continue
            reason = f"its process {owner} is gone (killed or crashed)"
            if close:
                _close_dead(sel.tracker, run.info.run_id, reason)
            lines.append(f"{s.label}: confirmation seed {run.data.tags.get('kdsweep.confirm_seed', '?')} was lost "
                         f"({reason}): run `kdsweep confirm` again")
    return lines


def _train_one(sel: Selection, s: StudyRuns, method_cls, teacher, t_shapes, data, seed: int, run: str, say: Say) -> bool:
    tracker, best = sel.tracker, s.best
    p = best.data.params
    hp = {k: float(p[k]) for k in [*method_cls.space, "lr"] if k in p}
    schedule = Schedule(int(p["epochs"]), int(p["batch_size"]), hp["lr"], float(p["momentum"]), float(p["weight_decay"]),
                        p.get("optimizer", "sgd"))  # runs from before the optimiser choice trained with SGD
    run_data = copy.copy(data)
    run_data.stream_seed = seed  # same split, fresh batch order and augmentation
    torch.manual_seed(seed)  # fresh student (and head) initialisation
    student = build_model(s.params["student"], data.in_shape, data.num_classes,
                          **taps.recorded_paths(s.params, "student")).to(data.device)
    method = method_cls({k: v for k, v in hp.items() if k != "lr"}, student.shapes(data.in_shape), t_shapes,
                        schedule.epochs).to(data.device)

    source_trial = best.data.tags.get("kdsweep.trial", "")
    params = {**p, "device": data.device.type, "confirm_seed": seed, "source_trial": source_trial,
              "extra_params": count_params(method)}
    curves = Curves(tracker, run)
    try:
        tracker.log(run, params=params)
        result = train_student(student, method, teacher, run_data, schedule,
                               on_epoch=lambda st: curves.add(st.epoch, st.metrics()))
        final = record_result(tracker, run, data, s.params["student"], student, method, result,
                              {"method": s.method, "study": s.name, "confirm_seed": seed, "source_trial": source_trial,
                               "hparams": hp})
        end = outcome.Ending(epochs=len(result.history), seconds=sum(st.seconds for st in result.history))
    except BaseException as e:
        end = outcome.Ending(error=e)
    end.history = curves.take()
    # A seed has no Optuna trial: it ends through the same table, MLflow side only.
    ended = outcome.end_trial(outcome.Records(tracker, run, say=say), outcome.classify(end.error), end)
    if not outcome.classify(end.error).goes_on:
        raise end.error
    if ended is not outcome.COMPLETE:
        say(f"  seed {seed}: {outcome.reason_of(ended, end.error)}; recorded as FAIL")
        return False
    say(f"  seed {seed}: val_acc={result.best_val_acc:.4f} test_acc={final['test_acc']:.4f} (run {run})")
    return True


def _close_dead(tracker, run: str, reason: str) -> None:
    """End a confirmation run whose process is gone, as a trial run of a lost worker ends."""
    outcome.end_trial(outcome.Records(tracker, run), outcome.WORKER_LOST, outcome.Ending(reason=reason))
