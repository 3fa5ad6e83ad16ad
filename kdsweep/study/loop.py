"""Optuna studies, one per distillation method, every trial tracked as a nested MLflow run; the studies of a
sweep run together (run_studies), sharing stores, data and teacher (resources.py) and lockstep groups.

Order of work per study, chosen so a bad input fails before anything is written:
config -> pair check -> device (+ threads, teacher cache) -> Optuna storage ->
MLflow store -> data -> resume pre-check (settings, split: read-only, before a
teacher is trained) -> teacher (judged before any trial) -> study + identity check + parent run, Optuna
checked against MLflow (store_agreement.py; under the study lock). Then the trials of every study: claimed
under each study's lock and dealt round-robin, one at a time or --parallel K in lockstep (trial.py; each
ends through outcome.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import time
import warnings
from typing import Any, Callable

import optuna
import torch

from kdsweep.common import digests, failures
from kdsweep.common.bars import tqdm
from kdsweep.common.errors import UserError
from kdsweep.common.locks import StudyLock
from kdsweep.common.processes import Owner, index_here, processes_here
from kdsweep.common.space import edge_warnings
from kdsweep.common.uris import redact, scrub
from kdsweep.data.device_data import DeviceData, check_split
from kdsweep.data.dispatch import get_dataset
from kdsweep.methods.registry import get_method
from kdsweep.models import factory
from kdsweep.models.zoo import count_params, tap_paths
from kdsweep.study import fixed_inputs, store_agreement
from kdsweep.study import outcome as oc
from kdsweep.study.best import best_trial
from kdsweep.study.budget import Spent
from kdsweep.study.config import StudyConfig
from kdsweep.study.optuna_storage import count, make_pruner, make_sampler
from kdsweep.study.pairs import _conflict, check_pair, pair_tags
from kdsweep.study.progress import Reporter
from kdsweep.study.resources import Resources
from kdsweep.study.trial import Entry, StudyContext, execute, execute_group, trial_params
from kdsweep.study.workers import check_stop, claim, recover_stale, retry
from kdsweep.tracking.notes import study_note
from kdsweep.tracking.tracker import Tracker
from kdsweep.tracking.vocabulary import (
    CONFIG_ATTR,
    EPOCHS_ATTR,
    NOTE_TAG,
    OWNER_ATTR,
    PARENT_ATTR,
    REASON_ATTR,
    REASON_TAG,
    RUN_FAILED,
    RUN_FINISHED,
    RUN_ID_ATTR,
    RUN_KILLED,
    RUN_RUNNING,
    TEACHER_ACCEPTED_TAG,
)
from kdsweep.training import teacher_outputs
from kdsweep.training.devices import Accel, prepare_cpu, resolve_device
from kdsweep.training.teacher import check_teacher

optuna.logging.set_verbosity(optuna.logging.WARNING)

OBJECTIVE = "val_acc"
RESUME_HINT = "use the original settings to resume, or --study-name NEW for a new study"


def data_provenance(data: DeviceData) -> dict[str, Any]:
    """What a study's data was, as run params: for a spec (sources.py) where it was read, its classes, image size,
    files and normalisation, and the digest of its training split; store.split_data reads image_size and
    data_dir back to rebuild the split. Built-ins are named by `dataset` alone and add nothing."""
    if not data.provenance:
        return {}
    p = {k: v for k, v in data.provenance.items() if k != "data_cache"}
    train = digests.tensor_digest(data.train_x) + digests.tensor_digest(data.train_y)
    return {**p, "norm_mean": ",".join(f"{v:.4f}" for v in data.mean), "norm_std": ",".join(f"{v:.4f}" for v in data.std),
            "train_sha256": hashlib.sha256(train.encode()).hexdigest()}


def _model_params(cfg: StudyConfig, data: DeviceData, teacher: torch.nn.Module | None, teacher_info: dict) -> dict[str, Any]:
    """Provenance of the pair: parameter counts, where each model's taps are read, the teacher file's SHA-256."""
    student = factory.build_for(cfg, "student", data.in_shape, data.num_classes)
    out = {"student_params": count_params(student), **{f"student_{k}": v for k, v in tap_paths(student).items()}}
    if teacher is not None:
        out.update({"teacher_params": count_params(teacher), **{f"teacher_{k}": v for k, v in tap_paths(teacher).items()},
                    "teacher_file_sha256": teacher_info.get("file_sha256", "")})
    return out


def _perf_setup(cfg: StudyConfig, device: torch.device) -> tuple[teacher_outputs.TeacherCache, Accel, dict[str, Any]]:
    """The device path of a study: CPU threads, the shared teacher cache, memory format, compile; and their params."""
    threads = prepare_cpu(default=get_dataset(cfg.dataset).cpu_threads) if device.type == "cpu" else None
    cache = teacher_outputs.shared(cfg.teacher_cache_mb, device)
    accel = Accel(channels_last=cfg.channels_last, compile=cfg.compile, cpu_workers=cfg.cpu_workers, fused=cfg.fused)
    params = {"parallel": cfg.parallel, "teacher_cache_mb": round(cache.budget / 2**20, 1), "channels_last": cfg.channels_last,
              "compile": cfg.compile, "cpu_threads": threads or "", "threads_per_student": (1 if cfg.cpu_workers != 0 else threads) if device.type == "cpu" else "",
              "cpu_workers": "" if device.type != "cpu" else cfg.cpu_workers if cfg.cpu_workers is not None else "auto",
              "fused": "auto" if cfg.fused is None else cfg.fused, "processes": processes_here()}
    return cache, accel, params


def _check_resume(study: optuna.Study, cfg: StudyConfig) -> None:
    if study.user_attrs.get(CONFIG_ATTR) is None:
        study.set_user_attr(CONFIG_ATTR, cfg.fingerprint())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([OBJECTIVE])  # optuna-dashboard then says val_acc, not "Objective 0"
        return
    why = _conflict(study, cfg)
    if why:
        raise UserError(f"{why}; {RESUME_HINT}")


def _precheck(storage: optuna.storages.RDBStorage, cfg: StudyConfig, split: dict, teacher: dict | None = None) -> str | None:
    """Refuse a resume with other settings or another data split now, read-only, before a teacher is trained (and
    again with the teacher's record, before the teacher's quality is judged: another teacher is the first thing to say);
    the digest of the teacher the study recorded (which this worker then fetches if it lacks it)."""
    if cfg.full_study_name not in optuna.get_all_study_names(storage):
        return None  # a new study: nothing to compare with
    study = optuna.load_study(study_name=cfg.full_study_name, storage=storage)
    why = _conflict(study, cfg)
    if why:
        raise UserError(f"{why}; {RESUME_HINT}")
    fixed_inputs.check(cfg.full_study_name, study.user_attrs, split, teacher)
    return (study.user_attrs.get(fixed_inputs.TEACHER_ATTR) or {}).get("sha256")


def _parent_run(tracker: Tracker, exp: str, study: optuna.Study, cfg: StudyConfig, base_params: dict,
                say: Callable[[str], None] = print) -> str:
    """The study's parent run, found or made, after Optuna and MLflow were checked to agree (see store_agreement.py)."""
    name, recorded = cfg.full_study_name, study.user_attrs.get(PARENT_ATTR)
    found = store_agreement.find_parent(tracker, exp, name, recorded)
    disagreement = store_agreement.check(tracker, exp, study, name, found, recorded, RUN_ID_ATTR)
    run = store_agreement.settle(tracker, disagreement, cfg.on_mismatch, say)  # refuses unless told to repair or ignore
    if run is None:
        run = tracker.start(exp, name, {"kdsweep.role": "study", "kdsweep.study": name, "kdsweep.method": cfg.method,
                                        "kdsweep.label": cfg.name, "kdsweep.per_trial": cfg.budget_tag})
        space = {f"space.{k}": v.to_param() for k, v in cfg.space.items()}  # structured: JSON
        tracker.log(run, params={**base_params, **space, **{f"fixed.{k}": v for k, v in cfg.fixed.items()},
                                 "sampler": cfg.sampler, "pruner": cfg.pruner, **_settings_params(cfg, study)})
        study.set_user_attr(PARENT_ATTR, run)
    else:
        tracker.client.update_run(run, status=RUN_RUNNING)
        have = tracker.client.get_run(run).data.params  # a parent made by an older kdsweep: add what it lacks
        tracker.log(run, params={k: v for k, v in _settings_params(cfg, study).items() if k not in have})
    if disagreement and cfg.on_mismatch == "repair":
        store_agreement.restore(tracker, exp, run, disagreement, cfg.method, {**base_params, **cfg.fixed}, RUN_ID_ATTR, say)
    if not (disagreement.foreign and cfg.on_mismatch == "ignore"):
        store_agreement.bind(tracker, run, study)
    # The stopping rule may grow on resume (--trials 40 after 30): a tag, since params cannot change.
    tracker.log(run, tags={"kdsweep.budget": cfg.budget.describe()})
    _write_note(tracker, run, study, cfg, _best_of(study))
    return run


def _settings_params(cfg: StudyConfig, study: optuna.Study) -> dict[str, Any]:
    """What every trial of the study computes, and the split it sees, as parent-run params for the MLflow UI.

    The budget (--trials/--budget-epochs) may grow on resume, and MLflow params cannot change: it is the
    tag kdsweep.budget and part of the run's description instead.
    """
    split = study.user_attrs.get(fixed_inputs.SPLIT_ATTR) or {}
    teacher = {"teacher_seed": cfg.resolved_teacher_seed, "teacher_control": cfg.teacher_control or "none"} \
        if get_method(cfg.method).uses_teacher else {}  # a teacher-free study serves every teacher's block
    return {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "momentum": cfg.momentum,
            "weight_decay": cfg.weight_decay, "teacher_epochs": cfg.teacher_epochs, "split_sha256": split.get("sha256", ""),
            **teacher}


def _best_of(study: optuna.Study) -> dict | None:
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        return None
    best = best_trial(study.get_trials(deepcopy=False))
    return {"number": best.number, "val_acc": best.value, "test_acc": best.user_attrs.get("test_acc")}


def _write_note(tracker: Tracker, run: str, study: optuna.Study, cfg: StudyConfig, best: dict | None) -> None:
    """The parent run's description (tracking/notes.py), rewritten when a run of the study starts and ends."""
    tracker.log(run, tags={NOTE_TAG: study_note(cfg, cfg.budget.spent_text(spent(study)), best)})


def _record_best(tracker: Tracker, parent: str, study: optuna.Study) -> dict | None:
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    counts = {s.name.lower(): count(study, s) for s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                                                        optuna.trial.TrialState.FAIL)}
    now = spent(study)
    metrics = {**{f"trials_{k}": v for k, v in counts.items()}, "trials_trained": now.trials, "epochs_trained": now.epochs}
    if not done:
        tracker.log(parent, metrics)
        return None
    best = best_trial(done)
    metrics.update(best_val_acc=best.value, best_test_acc=best.user_attrs.get("test_acc", math.nan), best_trial=best.number)
    # Params are immutable in MLflow, but the best trial changes as a study grows: tags instead (not metrics,
    # which MLflow's chart view would open on as single-point charts).
    tags = {f"best.{k}": f"{v:.6g}" for k, v in best.params.items()}
    tags["best.run_id"] = best.user_attrs.get(RUN_ID_ATTR, "")
    tracker.log(parent, metrics, tags=tags, step=len(study.trials))
    return {"number": best.number, "val_acc": best.value, "test_acc": best.user_attrs.get("test_acc"),
            "params": best.params, "run_id": best.user_attrs.get(RUN_ID_ATTR)}


# --------------------------------------------------------------------------- workers: claim, run, recover

COMPLETE, PRUNED, FAIL, RUNNING = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                                   optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING)


def _recover(ctx: StudyContext) -> list[tuple[optuna.trial.FrozenTrial, str, bool]]:
    """Fail the stale trials of dead workers and queue their retries (call under the lock)."""
    found: list[tuple[optuna.trial.FrozenTrial, str, bool]] = []

    def on_stale(trial: optuna.trial.FrozenTrial, reason: str) -> None:
        retried = retry(ctx.study, trial, reason)
        found.append((trial, reason, retried))

    recover_stale(ctx.study, ctx.storage, ctx.grace, ctx.lock.exact, on_stale)
    return found


def _report_recovered(ctx: StudyContext, found: list[tuple[optuna.trial.FrozenTrial, str, bool]]) -> None:
    """Say what was recovered and close the MLflow runs the dead workers left open (outside the lock)."""
    if not found:
        return
    for trial, reason, retried in found:
        then = "its parameters are retried next" if retried else "a new trial replaces it"
        ctx.say(f"trial {trial.number} was left RUNNING ({reason}): marked FAIL; {then}.")
    _close_orphan_runs(ctx, {t.number: reason for t, reason, _ in found})


def _close_orphan_runs(ctx: StudyContext, recovered: dict[int, str] | None = None, finished_too: bool = False) -> int:
    """Close trial runs that MLflow holds open (or FINISHED) although Optuna has ended their trial.

    A worker killed mid-trial leaves its run RUNNING; one killed after closing
    its run but before telling Optuna leaves a FINISHED run for a trial that
    Optuna now holds as FAIL. Both become KILLED, with the reason as a tag.
    FINISHED runs are checked for the trials just `recovered`, and for all
    trials with `finished_too` (at start: a worker may have died between
    recovering a trial and closing its run), as are runs closed as interrupted
    of trials Optuna completed (oc.closed_as_interrupted).
    """
    trials = {t.number: t for t in ctx.study.get_trials(deepcopy=False)}
    if not trials:  # a new study: every run found would be skipped below (no trial of it has ended)
        return 0
    recovered = recovered or {}
    tags = {"kdsweep.role": "trial", "kdsweep.study": ctx.cfg.full_study_name}
    statuses = (RUN_RUNNING, RUN_FINISHED) if finished_too else (RUN_RUNNING,)
    runs = ctx.tracker.find_runs(ctx.experiment_id, tags, statuses=statuses)
    if finished_too:
        runs += ctx.tracker.find_runs(ctx.experiment_id, {**tags, REASON_TAG: oc.INTERRUPTED.reason},
                                      statuses=(oc.INTERRUPTED.status,))
    for number in () if finished_too else recovered:
        runs += ctx.tracker.find_runs(ctx.experiment_id, {**tags, "kdsweep.trial": number}, statuses=(RUN_FINISHED,))
    closed = 0
    for run in runs:
        try:
            number = int(run.data.tags.get("kdsweep.trial", ""))
        except ValueError:
            continue
        trial = trials.get(number)
        if trial is None or not trial.state.is_finished():
            continue  # a live worker's trial
        row = oc.recorded_outcome(trial)
        if oc.closed_as_interrupted(run):
            if row is not oc.COMPLETE or trial.user_attrs.get(RUN_ID_ATTR) != run.info.run_id:
                continue  # closed as it should be, or not this trial's run
            ctx.tracker.client.delete_tag(run.info.run_id, REASON_TAG)  # a complete trial has no reason
        elif row is oc.COMPLETE and run.info.status != RUN_RUNNING:
            continue  # closed as it should be
        reason = recovered.get(number) or trial.user_attrs.get(REASON_ATTR) or "its worker stopped without closing this run"
        # Its MLflow end written from Optuna's record (the trial's end was, and is not written again).
        oc.end_trial(oc.Records(ctx.tracker, run.info.run_id, say=ctx.say), row,
                     oc.Ending(reason=reason if trial.state == FAIL else "", epochs=trial.user_attrs.get(EPOCHS_ATTR)))
        closed += 1
    return closed


def spent(study: optuna.Study) -> Spent:
    return Spent.of(study.get_trials(deepcopy=False))


def _claim_next(ctx: StudyContext) -> optuna.Trial | None:
    """The study's next trial for this worker, claimed under the study lock; None if its budget has no room now.

    A trial is created only while the budget has room for it with every
    running trial counted in full (budget.py), so workers together never
    overshoot.
    """
    with ctx.lock:
        found = _recover(ctx)
        trial = None
        trials = ctx.study.get_trials(deepcopy=False)  # one read for the budget and the count
        if ctx.cfg.budget.room(Spent.of(trials)):
            # A fresh sampler per trial, seeded by the trial count: workers claiming in turn
            # never draw the same parameters, and a resumed study does not replay old draws.
            ctx.study.sampler = make_sampler(ctx.cfg, len(trials))
            with warnings.catch_warnings():
                # "Heartbeat of storage is supposed to be used with Study.optimize": we beat ourselves.
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                trial = ctx.study.ask()
            try:
                # Draw the parameters now, with this trial's sampler: suggest() later returns the stored values,
                # so trials claimed together (--parallel) get the same draws as when claimed one by one.
                trial_params(ctx, trial)
                claim(trial, ctx.owner)
            except BaseException as e:
                oc.end_trial(ctx.records(trial), oc.classify(e), oc.Ending(error=e))
                raise
    _report_recovered(ctx, found)
    return trial


def _share(ctxs: list[StudyContext], size: int) -> int:
    """How many trials this worker claims at once: --parallel, or, when its command runs as N worker processes
    (--processes), at most its 1/N of the trials that can run now (those left to claim and those the others run).
    Otherwise the first worker to ask takes every trial of a short resume and trains them on its one core while
    the others wait."""
    n = processes_here()
    if n == 1:
        return size
    now = [(c.cfg.budget, spent(c.study)) for c in ctxs]
    left = [b.claimable(s) for b, s in now]
    if None in left:
        return size
    return max(1, min(size, -(-(sum(left) + sum(s.running for _, s in now)) // n)))


_SIBLINGS = ""  # in `said_waiting`: the wait for this command's other workers has been said


def _seen_whole(ctx: StudyContext) -> tuple[list[optuna.trial.FrozenTrial], Spent, int]:
    """The study's trials, what they spent, and how many of its running trials this command's other worker
    processes own (--processes). Read under the study lock: a fellow claims a trial and then writes its owner
    under it, and a claim read between the two would count as a trial running elsewhere."""
    with ctx.lock:
        trials = ctx.study.get_trials(deepcopy=False)
    now, fellows = Spent.of(trials), 0
    if processes_here() > 1 and now.running:
        owners = (Owner.from_attr(t.user_attrs.get(OWNER_ATTR)) for t in trials if t.state == RUNNING)
        fellows = sum(1 for o in owners if o is not None and o.is_fellow() and o.alive() is True)
    return trials, now, fellows


def _dealing_order(ctxs: list[StudyContext], turn: int) -> tuple[list[StudyContext], list[StudyContext]]:
    """The studies this worker deals from: its own slice first, then the others', each from study number `turn`
    on (a sweep's methods take turns).

    Alone, its slice is every study. Worker i of a --processes N command owns studies i, i + N, i + 2N, ..., so
    each worker's group holds fewer methods with more members each, whose losses are batched (docs/performance.md,
    "Worker processes"), and a study's trials that share work (crd's negatives) share a process. Dealt in turn,
    not in halves: methods are listed with their like (logit methods, then feature methods; a paper form beside
    its seed-003 form), so halves put the cheap ones in one worker, which then idles while the other ends (the
    4-method sweep's workers ended 1.2-3.6 s apart). The others' slices follow, so no worker idles while any
    study has room."""
    n, i = processes_here(), index_here()

    def turned(studies: list[StudyContext]) -> list[StudyContext]:
        return studies[turn % len(studies):] + studies[:turn % len(studies)] if studies else []

    return turned(ctxs[i::n]), turned([c for k, c in enumerate(ctxs) if k % n != i])


def _claim_group(ctxs: list[StudyContext], size: int, said_waiting: set[str], turn: int = 0) -> list[Entry]:
    """Up to `size` trials, dealt round-robin over the studies whose budget has room, in `_dealing_order`;
    [] once every study is done. While the rest of every open study's budget is reserved by trials running
    elsewhere, wait: one of them may be pruned early or be lost and retried."""
    while True:
        group: list[Entry] = []
        for studies in _dealing_order(ctxs, turn):
            open_ = list(studies)
            while open_ and len(group) < size:
                for ctx in list(open_):
                    if len(group) == size:
                        break
                    trial = _claim_next(ctx)
                    if trial is None:
                        open_.remove(ctx)
                    else:
                        group.append((ctx, trial))
        if group:
            return group
        unfinished = [(c, spent(c.study)) for c in ctxs]
        unfinished = [(c, now) for c, now in unfinished if not c.cfg.budget.done(now)]
        if not unfinished:
            return []
        for ctx, _ in unfinished:
            name = ctx.cfg.full_study_name
            if name in said_waiting:
                continue
            said_waiting.add(name)
            _, now, fellows = _seen_whole(ctx)
            if now.running > fellows:
                ctx.say(f"{now.running} trial(s) running in other workers would complete study {name!r}; waiting for them.")
            elif _SIBLINGS not in said_waiting:  # this command's own workers: said once, not per study
                said_waiting.add(_SIBLINGS)
                ctx.say("Waiting for the last trials of this command's other worker process(es).")
        time.sleep(unfinished[0][0].poll)
        check_stop()


def _close_parent(ctx: StudyContext, status: str) -> None:
    """End the parent run, unless trials of other live workers still run under it."""
    others = [t for t in ctx.study.get_trials(deepcopy=False, states=(RUNNING,))
              if t.user_attrs.get(OWNER_ATTR) != ctx.owner.as_attr()]
    if not others:
        ctx.tracker.end(ctx.parent_run, status)


def _finish(ctx: StudyContext, status: str) -> dict | None:
    """Summarise into the parent run and close it; never mask the exception that ended the study.

    Each step on its own: with the Optuna store broken (full, corrupt) the summary cannot be read, but
    the parent run can still be closed; if even that fails, the next start reopens and closes it.
    """
    best, problems = None, []
    try:
        best = _record_best(ctx.tracker, ctx.parent_run, ctx.study)
        _write_note(ctx.tracker, ctx.parent_run, ctx.study, ctx.cfg, best)
    except Exception as e:  # noqa: BLE001 - e.g. the tracking server went away during an interrupt
        problems.append(e)
    try:
        _close_orphan_runs(ctx)
    except Exception as e:  # noqa: BLE001
        problems.append(e)
    try:
        _close_parent(ctx, status)
    except Exception as e:  # noqa: BLE001
        problems.append(e)
        with contextlib.suppress(Exception):  # Optuna could not say which trials still run: close it all the same
            ctx.tracker.end(ctx.parent_run, status)
    # A store that failed and stopped the study is reported once, by the CLI, not here as well.
    if problems and not (status == RUN_FAILED and failures.explain(problems[0])):
        why = failures.explain(problems[0]) or str(problems[0]).splitlines()[0][:200]
        ctx.say(f"warning: could not update MLflow at the end of the study: {scrub(why, ctx.tracker.uri)}")
    return best


def _base_params(cfg: StudyConfig, data: DeviceData, device: torch.device, teacher: torch.nn.Module | None,
                 teacher_info: dict, perf_params: dict[str, Any]) -> dict[str, Any]:
    """The params every run of the study logs: what it trains, on what data and device, with which teacher."""
    return {"method": cfg.method, "study": cfg.full_study_name, "dataset": cfg.dataset, "teacher": cfg.teacher,
            "student": cfg.student, "seed": cfg.seed, "data_size": data.n_train, "val_size": len(data.val_y),
            "test_size": len(data.test_y), "val_fraction": cfg.val_fraction, "augment": data.augment.describe(),
            "preprocess": cfg.preprocess, "inputs": data.preprocess,
            "device": device.type, "teacher_checkpoint": teacher_info.get("path", ""),
            "teacher_val_acc": teacher_info.get("val_acc", ""), "teacher_sha256": teacher_info.get("sha256", ""),
            **_model_params(cfg, data, teacher, teacher_info), **perf_params, **data_provenance(data)}


def _open_study(cfg: StudyConfig, say: Callable[[str], None], reporter: Reporter, resources: Resources) -> StudyContext:
    """Everything before the first trial, in the order of the module docstring; the context trials share.
    Stores, data and teacher come from `resources`: opened by the first study that needs them."""
    method_cls = get_method(cfg.method)
    device = resolve_device(cfg.device)
    cache, accel, perf_params = _perf_setup(cfg, device)  # the CPU threads first: the pair check runs torch
    check_pair(cfg)
    storage = resources.storage(cfg.storage)
    if cfg.full_study_name != cfg.requested_study_name and cfg.full_study_name not in optuna.get_all_study_names(storage):
        say(f"study name {cfg.requested_study_name!r} is stored as {cfg.full_study_name!r}")  # once: when it is new
    tracker = resources.tracker(cfg.tracking_uri, say)
    data = resources.data(cfg, device)
    check_split(data, cfg.batch_size, cfg.val_fraction, say)  # before a teacher is trained on it
    split = fixed_inputs.split_record(data)
    wanted = _precheck(storage, cfg, split)
    teacher, teacher_info = resources.teacher(cfg, data, say, storage.url, wanted) if method_cls.uses_teacher else (None, {})
    accepted = None
    if teacher is not None:  # before the study is created or any trial trains
        _precheck(storage, cfg, split, fixed_inputs.teacher_record(teacher_info))
        accepted = check_teacher(cfg, data, teacher, teacher_info, say)

    name = cfg.full_study_name
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                sampler=make_sampler(cfg, 0), pruner=make_pruner(cfg))
    lock = StudyLock(storage.url, name)
    if not lock.exact:
        say(f"warning: no cross-worker lock for {redact(storage.url).split(':', 1)[0]} storage; several workers may "
            f"overshoot --trials (use SQLite on one host, or PostgreSQL)")
    old = cfg.legacy_experiment_name
    exp = tracker.experiment(old if tracker.client.get_experiment_by_name(old) else cfg.experiment_name, pair_tags(cfg))
    base_params = _base_params(cfg, data, device, teacher, teacher_info, perf_params)
    with lock:  # one parent run, however many workers start at once
        _check_resume(study, cfg)
        fixed_inputs.check_and_record(study, split, fixed_inputs.teacher_record(teacher_info))
        store_agreement.check_name(study, cfg.requested_study_name, name)
        parent = _parent_run(tracker, exp, study, cfg, base_params, say)
    if accepted:
        tracker.log(parent, tags={TEACHER_ACCEPTED_TAG: f"--accept-teacher: it {accepted}"})
    return StudyContext(cfg, data, teacher, teacher_info, tracker, exp, parent, say, base_params,
                        study=study, storage=storage, lock=lock, owner=Owner.me(), heartbeat=storage.heartbeat_interval,
                        grace=storage.grace_period, poll=_poll(), cache=cache, accel=accel, reporter=reporter)


def _poll() -> float:
    """How often a worker with nothing to claim looks again. The workers of one --processes command wait on each
    other's trials (a study's last budget, freed when a trial is pruned, goes to whichever worker is free) and
    end together: at 2 s the free core idled a second on average each time, and every command ended up to 2 s
    after its last trial. A look reads every open study's trials: 10 ms for the MNIST-1D verdict's 15 studies on
    SQLite."""
    return 0.25 if processes_here() > 1 else StudyContext.poll


def _say_where(ctx: StudyContext) -> None:
    """Say what the study has spent so far, and open its line in a log."""
    cfg, name, budget = ctx.cfg, ctx.cfg.full_study_name, ctx.cfg.budget
    trials, now, fellows = _seen_whole(ctx)  # the fellows' trials are not news to this command
    if budget.done(now):
        ctx.say(f"Study {name!r} has spent its budget of {budget.describe()} ({budget.spent_text(now)}); nothing to run.")
    elif now.running > fellows:
        ctx.say(f"Joining study {name!r}: {budget.spent_text(now)} of {budget.describe()}, {now.running - fellows} running "
                f"elsewhere (or left by a dead worker: recovered when claiming).")
    elif len(trials) > fellows:
        ctx.say(f"Resuming study {name!r}: {budget.spent_text(now)} of {budget.describe()}.")
    ctx.reporter.study_start(name, f"{cfg.method}, {cfg.epochs}-epoch trials, budget {budget.describe()}; "
                                   f"spent so far: {budget.spent_text(now)}")


def _run_trials(ctxs: list[StudyContext]) -> None:
    """Claim and train trials until every study has spent its budget (or --timeout); a bar shows the budget."""
    first = ctxs[0].cfg
    progress = [c.cfg.budget.progress(spent(c.study)) for c in ctxs]
    unit = "epoch" if progress[0][1] == first.budget_epochs else "trial"
    bar = tqdm(total=sum(t for _, t in progress), initial=sum(d for d, _ in progress),
               desc=first.method if len(ctxs) == 1 else f"{len(ctxs)} studies", unit=unit, disable=not ctxs[0].reporter.bars)
    timeout = min((c.cfg.timeout for c in ctxs if c.cfg.timeout is not None), default=None)
    start, failed, said_waiting = time.monotonic(), dict.fromkeys((id(c) for c in ctxs), 0), set()
    try:
        for turn in itertools.count():
            if timeout is not None and time.monotonic() - start > timeout:
                ctxs[0].say(f"--timeout {timeout:g}s reached; run the same command again to continue.")
                break
            check_stop()
            group = _claim_group(ctxs, _share(ctxs, first.parallel), said_waiting, turn)
            if not group:
                break
            outcomes = [execute(*group[0])] if len(group) == 1 else execute_group(group)
            for (ctx, _), o in zip(group, outcomes):
                failed[id(ctx)] += o.optuna == FAIL
                _stop_on_failures(ctx, failed[id(ctx)])
            if not bar.disable:  # reading every study back costs a storage query each: only for a bar people see
                bar.n = sum(c.cfg.budget.progress(spent(c.study))[0] for c in ctxs)
                bar.set_postfix_str(_bar_text(ctxs))
                bar.refresh()
    finally:
        bar.close()


def _stop_on_failures(ctx: StudyContext, failed: int) -> None:
    """A run of failures that train nothing (a bug, a broken store) must not loop forever."""
    cfg = ctx.cfg
    most = cfg.trials if cfg.trials is not None else math.ceil(cfg.budget_epochs / cfg.epochs)
    if failed > most:
        raise UserError(f"{failed} trials of {cfg.name} failed in this run (see the FAIL runs' kdsweep.reason tags in "
                        f"MLflow); stopping")


def _bar_text(ctxs: list[StudyContext]) -> str:
    """The bar's postfix: one study's counts and best val_acc, or a sweep's best val_acc per method."""
    if len(ctxs) > 1:
        return " ".join(f"{c.cfg.name}={_best_value(c.study):.3f}" for c in ctxs)
    study, now = ctxs[0].study, spent(ctxs[0].study)
    return (f"done={now.by_state.get(COMPLETE.name, 0)} pruned={now.by_state.get(PRUNED.name, 0)} "
            f"failed={count(study, FAIL)} epochs={now.epochs} best_val={_best_value(study):.4f}")


def _best_value(study: optuna.Study) -> float:
    done = study.get_trials(deepcopy=False, states=(COMPLETE,))
    return best_trial(done).value if done else float("nan")


def _summary(ctx: StudyContext, best: dict | None) -> dict:
    cfg, study, now = ctx.cfg, ctx.study, spent(ctx.study)
    return {"study": cfg.full_study_name, "storage": redact(ctx.storage.url if hasattr(ctx.storage, "url") else str(cfg.storage)),
            "tracking_uri": redact(ctx.tracker.uri), "experiment": ctx.tracker.client.get_experiment(ctx.experiment_id).name,
            "experiment_id": ctx.experiment_id,
            "parent_run": ctx.parent_run, "complete": count(study, COMPLETE), "pruned": count(study, PRUNED),
            "failed": count(study, FAIL), "best": best, "trained": now.trials, "epochs": now.epochs,
            "budget": cfg.budget.describe(), "edges": edge_warnings(best["params"], cfg.space) if best else [],
            "teacher": ctx.teacher_info, "teacher_cache": ctx.cache.stats()}


def run_studies(cfgs: list[StudyConfig], say: Callable[[str], None] = print, reporter: Reporter | None = None) -> list[dict]:
    """Run (or resume) several studies of one pair together until each has spent its budget; their summaries.

    They share the stores, data and teacher (resources.py) and their trials are dealt into the same
    lockstep groups (--parallel K): start-up is paid once, and one batch and one teacher output serve
    every method. Each study keeps its own budget, sampler, pruner and parent run.
    """
    reporter = reporter or Reporter.auto()
    if say is print:
        say = reporter.say  # flushed in logs, on stderr with --quiet
    resources, opened, status = Resources(), {}, RUN_FINISHED
    # Studies that need a teacher open first: a teacher refused (check_teacher) stops the run before a
    # teacher-free study (ce) is made, so a refusal leaves no study behind.
    order = sorted(range(len(cfgs)), key=lambda i: not get_method(cfgs[i].method).uses_teacher)
    try:
        for i in order:
            opened[i] = ctx = _open_study(cfgs[i], say, reporter, resources)
            _close_orphan_runs(ctx, finished_too=True)
            _say_where(ctx)
        ctxs = [opened[i] for i in range(len(cfgs))]
        with contextlib.ExitStack() as scopes:  # what a method keeps for its study's later trials (methods/base.py)
            for method in dict.fromkeys(get_method(c.method) for c in cfgs):
                scopes.enter_context(method.study_scope())
            _run_trials(ctxs)
    except KeyboardInterrupt:
        status = RUN_KILLED
        raise
    except BaseException:
        status = RUN_FAILED
        raise
    finally:
        ctxs = [opened[i] for i in sorted(opened)]
        bests = [_finish(ctx, status) for ctx in ctxs]
        for ctx in ctxs:
            ctx.lock.close()
    return [_summary(ctx, best) for ctx, best in zip(ctxs, bests)]


def run_study(cfg: StudyConfig, say: Callable[[str], None] = print, reporter: Reporter | None = None) -> dict:
    """Run (or resume) the study until it has spent its budget (budget.py); return a summary."""
    return run_studies([cfg], say, reporter)[0]
