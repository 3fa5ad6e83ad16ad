"""One Optuna study for one distillation method, every trial tracked as a nested MLflow run.

Order of work, chosen so a bad input fails before anything is written:
config -> pair check -> device (+ threads, teacher cache) -> Optuna storage ->
MLflow store -> data -> resume pre-check (settings, split: read-only, before a
teacher is trained) -> teacher -> study + identity check + parent run, Optuna
checked against MLflow (store_agreement.py; under the study lock) -> trials (claimed one
by one, or --parallel K at a time in lockstep).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import math
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
from tqdm.auto import tqdm

from kdsweep.common import digests, failures
from kdsweep.common.errors import UserError
from kdsweep.common.locks import StudyLock
from kdsweep.common.processes import Owner
from kdsweep.common.uris import redact, scrub
from kdsweep.data.device_data import DeviceData, check_split
from kdsweep.data.dispatch import get_dataset, load_data
from kdsweep.methods.registry import get_method
from kdsweep.methods.space import edge_warnings
from kdsweep.models import factory
from kdsweep.models.zoo import Shapes, count_params, tap_paths
from kdsweep.study import fixed_inputs, store_agreement
from kdsweep.study.best import best_trial
from kdsweep.study.budget import Spent
from kdsweep.study.config import StudyConfig
from kdsweep.study.optuna_storage import count, make_pruner, make_sampler, open_storage
from kdsweep.study.pairs import _conflict, check_pair, pair_tags
from kdsweep.study.progress import Reporter
from kdsweep.study.workers import (
    Heartbeat,
    check_stop,
    claim,
    recover_stale,
    retry,
)
from kdsweep.tracking.notes import study_note
from kdsweep.tracking.tracker import Tracker
from kdsweep.tracking.vocabulary import (
    CONFIG_ATTR,
    EPOCHS_ATTR,
    NOTE_TAG,
    OWNER_ATTR,
    PARENT_ATTR,
    REASON_ATTR,
    RUN_ID_ATTR,
)
from kdsweep.training import checkpoint, teacher_outputs
from kdsweep.training.devices import Accel, resolve_device, set_cpu_threads
from kdsweep.training.loop import (
    Member,
    NonFiniteLoss,
    Schedule,
    TrainResult,
    evaluate,
    train_student,
    train_students,
)
from kdsweep.training.teacher import get_teacher

optuna.logging.set_verbosity(optuna.logging.WARNING)

OBJECTIVE = "val_acc"
RESUME_HINT = "use the original settings to resume, or --study-name NEW for a new study"
# Exceptions that end one trial (recorded as FAIL) but not the study.
TRIAL_ERRORS = (NonFiniteLoss, torch.cuda.OutOfMemoryError)


@dataclass
class StudyContext:
    """Everything a trial needs that every trial shares (built once per study)."""

    cfg: StudyConfig
    data: DeviceData
    teacher: torch.nn.Module | None
    teacher_info: dict
    tracker: Tracker
    experiment_id: str
    parent_run: str
    say: Callable[[str], None] = print
    base_params: dict[str, Any] = field(default_factory=dict)
    # Worker coordination (see workers.py); set by run_study.
    study: optuna.Study | None = None
    storage: optuna.storages.RDBStorage | None = None
    lock: StudyLock | None = None
    owner: Owner | None = None
    heartbeat: int = 10
    grace: int = 60
    poll: float = 2.0
    # The device path (see train.py, teacher_outputs.py); set by run_study.
    cache: teacher_outputs.TeacherCache | None = None  # teacher outputs shared by the study's trials
    accel: Accel | None = None
    teacher_shapes: Shapes | None = None  # the frozen teacher's tap shapes: one dry forward per study, not per trial
    reporter: Reporter = field(default_factory=Reporter.auto)  # bars, log lines or nothing (progress.py)

    def __post_init__(self):
        if self.teacher is not None and self.teacher_shapes is None:
            self.teacher_shapes = self.teacher.shapes(self.data.in_shape)


def _trial_params(ctx: StudyContext, trial: optuna.Trial) -> dict[str, float]:
    hp = dict(ctx.cfg.fixed)
    for name, dist in ctx.cfg.space.items():
        hp[name] = dist.suggest(trial, name)
    return hp


@dataclass
class TrialRun:
    """One trial being trained: its models, settings and MLflow run."""

    trial: optuna.Trial
    hp: dict[str, float]
    schedule: Schedule
    student: torch.nn.Module
    method: torch.nn.Module
    run: str
    rng: tuple  # the RNG state right after initialisation (lockstep replays it)
    reported: list[int] = field(default_factory=list)  # epochs reported to Optuna (optuna.Trial has no intermediate_values)
    seconds: float = 0.0  # training wall time so far

    def spend(self, epochs: int) -> dict[str, float]:
        """Record on the trial that it trained `epochs` epochs (it then counts towards the budget); MLflow metrics."""
        self.trial.set_user_attr(EPOCHS_ATTR, epochs)
        return {"epochs_trained": epochs, "train_seconds": self.seconds}


def _start_trial(ctx: StudyContext, trial: optuna.Trial) -> TrialRun:
    """Sample the trial's parameters, build its student and heads, open and fill its MLflow run."""
    cfg, data, tracker = ctx.cfg, ctx.data, ctx.tracker
    method_cls = get_method(cfg.method)
    hp = _trial_params(ctx, trial)
    schedule = Schedule(cfg.epochs, cfg.batch_size, hp["lr"], cfg.momentum, cfg.weight_decay, cfg.optimizer)
    torch.manual_seed(cfg.seed)  # every trial starts from the same student initialisation
    student = factory.build_for(cfg, "student", data.in_shape, data.num_classes).to(data.device)
    s_shapes = student.shapes(data.in_shape)
    method = method_cls({k: v for k, v in hp.items() if k != "lr"}, s_shapes, ctx.teacher_shapes, cfg.epochs).to(data.device)
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state(data.device) if data.device.type == "cuda" else None)

    run = tracker.start(ctx.experiment_id, f"t{trial.number:03d}",  # short: the table cuts long names; the parent names the study
                        {"kdsweep.role": "trial", "kdsweep.method": cfg.method, "kdsweep.study": cfg.full_study_name,
                         "kdsweep.trial": trial.number, "kdsweep.state": "RUNNING"}, parent=ctx.parent_run)
    tr = TrialRun(trial, hp, schedule, student, method, run, rng)
    try:  # from here on, whatever stops the trial closes its run
        trial.set_user_attr(RUN_ID_ATTR, run)
        params = {**ctx.base_params, **hp, **vars(schedule), "extra_params": count_params(method)}
        tracker.log(run, params=params)
    except BaseException as e:
        _close_trial_run(ctx, tr, e)
        raise
    return tr


def _epoch_callback(ctx: StudyContext, tr: TrialRun) -> Callable:
    def on_epoch(stats):
        check_stop()
        ctx.tracker.log(tr.run, stats.metrics(), step=stats.epoch)
        tr.seconds += stats.seconds
        tr.trial.report(stats.val_acc, stats.epoch)
        tr.reported.append(stats.epoch)
        if tr.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {stats.epoch + 1} of {ctx.cfg.epochs}")  # 1-based for people

    return on_epoch


def _close_trial_run(ctx: StudyContext, tr: TrialRun, e: BaseException) -> None:
    """Tag and end a trial's MLflow run that stopped with `e` (pruned, failed or interrupted).

    Best effort: it runs while `e` propagates, and must not replace it (a Ctrl-C that landed
    inside an MLflow write leaves the store locked for a moment). A run left open here is
    closed by the orphan-run reconciliation when the study ends or resumes.
    """
    for attempt in range(2):  # a second try after the interrupted write's lock is released
        try:
            _tag_stopped_run(ctx, tr, e)
            return
        except Exception as err:  # noqa: BLE001
            if failures.explain(e) and failures.explain(err):
                return  # the store is full, corrupt or read-only: the CLI says so; a resume closes the run
            if attempt == 0:
                time.sleep(2.0)
                continue
            ctx.say(f"warning: could not close MLflow run {tr.run} of trial {tr.trial.number} now "
                    f"({type(err).__name__}); it is closed when the study ends or resumes")


def _tag_stopped_run(ctx: StudyContext, tr: TrialRun, e: BaseException) -> None:
    tracker, run, trial = ctx.tracker, tr.run, tr.trial
    if isinstance(e, optuna.TrialPruned):
        tracker.log(run, tr.spend(len(tr.reported)), tags={
            "kdsweep.state": "PRUNED", "kdsweep.pruned_at_epoch": tr.reported[-1] if tr.reported else -1, "kdsweep.reason": str(e)})
        tracker.end(run, "KILLED")
    elif isinstance(e, TRIAL_ERRORS):  # it trained until it diverged (or ran out of memory): it counts
        epoch = e.epoch if hasattr(e, "epoch") else len(tr.reported)  # an OOM: the epoch it was in
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:250]}"
        tracker.log(run, tr.spend(epoch + 1), tags={"kdsweep.state": "FAIL", "kdsweep.reason": reason,
                                                    "kdsweep.failed_at_epoch": epoch})
        trial.set_user_attr(REASON_ATTR, reason)
        trial.set_user_attr("failed_at_epoch", epoch)
        tracker.end(run, "FAILED")
    elif isinstance(e, KeyboardInterrupt):
        tracker.log(run, tags={"kdsweep.state": "FAIL", "kdsweep.reason": "interrupted"})
        _note_reason(trial, "interrupted")
        tracker.end(run, "KILLED")
    else:
        tracker.log(run, tags={"kdsweep.state": "FAIL", "kdsweep.reason": f"{type(e).__name__}: {str(e)[:200]}"})
        tracker.end(run, "FAILED")


def record_result(tracker: Tracker, run: str, data: DeviceData, arch: str, student: torch.nn.Module, method: torch.nn.Module,
                  result: TrainResult, meta: dict[str, Any], accel: Accel | None = None) -> dict[str, float]:
    """Evaluate the selected (best-val) epoch on test, log its checkpoint and final metrics, end the run FINISHED."""
    student.load_state_dict(result.state["student"])
    method.load_state_dict(result.state["heads"])
    test_loss, test_acc = evaluate(student, data, "test", accel)
    final = {"best_val_acc": result.best_val_acc, "best_epoch": result.best_epoch, "test_acc": test_acc, "test_loss": test_loss,
             "train_seconds": sum(s.seconds for s in result.history), "epochs_trained": len(result.history)}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint.save(Path(tmp) / "student.pt", arch, data.in_shape, data.num_classes, result.state,
                               {**meta, "best_epoch": result.best_epoch, "val_acc": result.best_val_acc, "test_acc": test_acc})
        tracker.client.log_artifact(run, str(ckpt), "checkpoint")
    tracker.log(run, final, tags={"kdsweep.state": "COMPLETE"}, step=result.best_epoch)
    tracker.end(run)
    return final


def _finish_trial(ctx: StudyContext, tr: TrialRun, result: TrainResult) -> float:
    """Record a trial that trained to the end; return its best val acc (the Optuna objective)."""
    cfg = ctx.cfg
    final = record_result(ctx.tracker, tr.run, ctx.data, cfg.student, tr.student, tr.method, result,
                          {"method": cfg.method, "study": cfg.full_study_name, "trial": tr.trial.number, "hparams": tr.hp},
                          ctx.accel)
    for k in ("test_acc", "best_epoch"):
        tr.trial.set_user_attr(k, final[k])
    tr.spend(len(result.history))  # last: a trial whose results could not be recorded does not count
    return result.best_val_acc


def run_trial(ctx: StudyContext, trial: optuna.Trial) -> float:
    """Train one trial alone; raises TrialPruned or a trial error, after closing its MLflow run."""
    tr = _start_trial(ctx, trial)
    bar = tqdm(total=ctx.cfg.epochs, desc=f"trial {trial.number}", unit="epoch", leave=False, disable=not ctx.reporter.bars)
    try:
        result = train_student(tr.student, tr.method, ctx.teacher, ctx.data, tr.schedule, on_epoch=_epoch_callback(ctx, tr),
                               progress=lambda e: bar.update(1), cache=ctx.cache, accel=ctx.accel)
    except BaseException as e:
        _close_trial_run(ctx, tr, e)
        raise
    finally:
        bar.close()
    try:
        return _finish_trial(ctx, tr, result)
    except BaseException as e:
        _close_trial_run(ctx, tr, e)
        raise


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
    threads = set_cpu_threads(default=get_dataset(cfg.dataset).cpu_threads) if device.type == "cpu" else None
    cache = teacher_outputs.shared(cfg.teacher_cache_mb, device)
    accel = Accel(channels_last=cfg.channels_last, compile=cfg.compile, cpu_workers=cfg.cpu_workers, fused=cfg.fused)
    params = {"parallel": cfg.parallel, "teacher_cache_mb": round(cache.budget / 2**20, 1), "channels_last": cfg.channels_last,
              "compile": cfg.compile, "cpu_threads": threads or "",
              "cpu_workers": "" if device.type != "cpu" else cfg.cpu_workers if cfg.cpu_workers is not None else "auto",
              "fused": "auto" if cfg.fused is None else cfg.fused}
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


def _precheck(storage: optuna.storages.RDBStorage, cfg: StudyConfig, split: dict) -> None:
    """Refuse a resume with other settings or another data split now, read-only, before a teacher is trained."""
    if cfg.full_study_name not in optuna.get_all_study_names(storage):
        return  # a new study: nothing to compare with
    study = optuna.load_study(study_name=cfg.full_study_name, storage=storage)
    why = _conflict(study, cfg)
    if why:
        raise UserError(f"{why}; {RESUME_HINT}")
    fixed_inputs.check(cfg.full_study_name, study.user_attrs, split, None)


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
        tracker.client.update_run(run, status="RUNNING")
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
    return {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "momentum": cfg.momentum,
            "weight_decay": cfg.weight_decay, "teacher_epochs": cfg.teacher_epochs, "split_sha256": split.get("sha256", "")}


def _best_of(study: optuna.Study) -> dict | None:
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        return None
    best = best_trial(study.get_trials(deepcopy=False))
    return {"number": best.number, "val_acc": best.value, "test_acc": best.user_attrs.get("test_acc")}


def _write_note(tracker: Tracker, run: str, study: optuna.Study, cfg: StudyConfig, best: dict | None) -> None:
    """The parent run's description (describe.py), rewritten when a run of the study starts and ends."""
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
    # Params are immutable in MLflow, but the best trial changes as a study grows: metrics and tags instead.
    metrics.update({f"best.{k}": v for k, v in best.params.items()})
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
    recovering a trial and closing its run).
    """
    recovered = recovered or {}
    tags = {"kdsweep.role": "trial", "kdsweep.study": ctx.cfg.full_study_name}
    runs = ctx.tracker.find_runs(ctx.experiment_id, tags, statuses=("RUNNING", "FINISHED") if finished_too else ("RUNNING",))
    for number in () if finished_too else recovered:
        runs += ctx.tracker.find_runs(ctx.experiment_id, {**tags, "kdsweep.trial": number}, statuses=("FINISHED",))
    trials = {t.number: t for t in ctx.study.get_trials(deepcopy=False)}
    closed = 0
    for run in runs:
        try:
            number = int(run.data.tags.get("kdsweep.trial", ""))
        except ValueError:
            continue
        trial = trials.get(number)
        if trial is None or not trial.state.is_finished():
            continue  # a live worker's trial
        if trial.state == COMPLETE:
            if run.info.status == "RUNNING":
                ctx.tracker.end(run.info.run_id)
                closed += 1
            continue
        reason = recovered.get(number) or trial.user_attrs.get(REASON_ATTR) or "its worker stopped without closing this run"
        ctx.tracker.close(run.info.run_id, "KILLED", {"kdsweep.state": trial.state.name, "kdsweep.reason": reason})
        closed += 1
    return closed


def spent(study: optuna.Study) -> Spent:
    return Spent.of(study.get_trials(deepcopy=False))


def _claim_next(ctx: StudyContext, wait: bool = True) -> optuna.Trial | None:
    """The next trial for this worker, claimed under the study lock; None once the study is done.

    A trial is created only while the budget has room for it with every
    running trial counted in full (budget.py), so workers together never
    overshoot. While the rest of the budget is reserved by trials running
    elsewhere, wait: one of them may be pruned early or be lost and retried.
    """
    waiting = False
    budget = ctx.cfg.budget
    while True:
        with ctx.lock:
            found = _recover(ctx)
            now = spent(ctx.study)
            trial = None
            if budget.room(now):
                # A fresh sampler per trial, seeded by the trial count: workers claiming in turn
                # never draw the same parameters, and a resumed study does not replay old draws.
                ctx.study.sampler = make_sampler(ctx.cfg, len(ctx.study.get_trials(deepcopy=False)))
                with warnings.catch_warnings():
                    # "Heartbeat of storage is supposed to be used with Study.optimize": we beat ourselves.
                    warnings.filterwarnings("ignore", message="Heartbeat of storage")
                    trial = ctx.study.ask()
                try:
                    # Draw the parameters now, with this trial's sampler: suggest() later returns the stored values,
                    # so trials claimed together (--parallel) get the same draws as when claimed one by one.
                    _trial_params(ctx, trial)
                    claim(trial, ctx.owner)
                except BaseException:
                    _tell(ctx, trial, FAIL, quiet=True)
                    raise
        _report_recovered(ctx, found)
        if trial is not None or budget.done(now) or not wait:
            return trial
        if not waiting:
            ctx.say(f"{now.running} trial(s) running in other workers would complete the study; waiting for them.")
            waiting = True
        time.sleep(ctx.poll)
        check_stop()


def _tell(ctx: StudyContext, trial: optuna.Trial, state, value: float | None = None, quiet: bool = False) -> bool:
    """Record a trial's end in Optuna; False if another worker had already failed it as stale."""
    try:
        ctx.study.tell(trial, value if state == COMPLETE else None, state=state, skip_if_finished=True)
        stored = ctx.storage.get_trial(trial._trial_id)
    except Exception:
        if quiet:
            return False
        raise
    if stored.state == state:
        return True
    if not quiet:
        ctx.say(f"trial {trial.number} had been marked {stored.state.name} by another worker "
                f"({stored.user_attrs.get(REASON_ATTR, 'stale')}); its result is not counted")
        run = stored.user_attrs.get(RUN_ID_ATTR)
        if run:
            ctx.tracker.close(run, "KILLED", {"kdsweep.state": stored.state.name, "kdsweep.reason": "failed as stale by another worker"})
    return False


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _note_reason(trial: optuna.Trial, reason: str) -> None:
    """Record why a trial failed, unless it already says, and that it does not count (it ended by no fault of
    its own: an interrupt, a store, a bug); never raises (it runs while cleaning up)."""
    try:
        if REASON_ATTR not in trial.user_attrs:
            trial.set_user_attr(REASON_ATTR, reason)
        trial.set_user_attr(EPOCHS_ATTR, None)
    except Exception:  # noqa: BLE001
        pass


def _report_end(ctx: StudyContext, trial: optuna.Trial) -> None:
    """Tell the reporter a trial ended, as Optuna now holds it (a log line; nothing in a terminal)."""
    if not ctx.reporter.lines:
        return
    try:
        frozen = ctx.storage.get_trial(trial._trial_id)
    except Exception:  # noqa: BLE001 - a log line is never worth stopping the study for
        return
    ctx.reporter.trial_end(ctx.cfg.name, frozen)


def _reports_end(execute: Callable) -> Callable:
    """`execute(ctx, trial or TrialRun, ...)` ends one trial: report it once it returns (not when it raises)."""
    @functools.wraps(execute)
    def run(ctx: StudyContext, which, *args):
        state = execute(ctx, which, *args)
        _report_end(ctx, which.trial if isinstance(which, TrialRun) else which)
        return state
    return run


@_reports_end
def _execute(ctx: StudyContext, trial: optuna.Trial) -> optuna.trial.TrialState:
    """Train one claimed trial with a heartbeat and record its end; a bad trial does not stop the study."""
    try:
        with Heartbeat(ctx.storage, trial._trial_id, ctx.heartbeat):
            value = run_trial(ctx, trial)
    except optuna.TrialPruned:
        return PRUNED if _tell(ctx, trial, PRUNED) else FAIL
    except TRIAL_ERRORS as e:
        ctx.say(f"trial {trial.number} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}; the study goes on")
        del e
        _free_memory(ctx.data.device)  # after an OOM, give the next trial the memory back
        _tell(ctx, trial, FAIL)
        return FAIL
    except BaseException as e:
        # Ctrl-C, or a bug: never leave the trial RUNNING. run_trial has closed its MLflow run if it
        # was training; if not, the run is closed (KILLED, with this reason) when the study ends.
        _note_reason(trial, "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {str(e)[:200]}")
        _tell(ctx, trial, FAIL, quiet=True)
        raise
    return COMPLETE if _tell(ctx, trial, COMPLETE, value) else FAIL


def _execute_group(ctx: StudyContext, trials: list[optuna.Trial]) -> list[optuna.trial.TrialState]:
    """Train claimed trials in lockstep on the same batches (--parallel); each reports, prunes and ends on its own."""
    started: list[TrialRun] = []
    bar = tqdm(total=ctx.cfg.epochs, desc=f"trials {trials[0].number}-{trials[-1].number}", unit="epoch", leave=False,
               disable=not ctx.reporter.bars)
    try:
        with contextlib.ExitStack() as beats:
            for t in trials:
                beats.enter_context(Heartbeat(ctx.storage, t._trial_id, ctx.heartbeat))
            for t in trials:
                started.append(_start_trial(ctx, t))
            members = [Member(tr.student, tr.method, tr.schedule, _epoch_callback(ctx, tr), rng=tr.rng) for tr in started]
            results = train_students(members, ctx.teacher, ctx.data, cache=ctx.cache, accel=ctx.accel,
                                     progress=lambda e: bar.update(1), stop_on=(optuna.TrialPruned,))
    except BaseException as e:  # the whole group stops: every trial is closed and told
        for tr in started:
            _close_trial_run(ctx, tr, e)
        reason = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {str(e)[:200]}"
        for t in trials:
            _note_reason(t, reason)
            _tell(ctx, t, FAIL, quiet=True)
        if isinstance(e, TRIAL_ERRORS):
            _free_memory(ctx.data.device)
            for t in trials:
                _report_end(ctx, t)
            return [FAIL] * len(trials)
        raise
    finally:
        bar.close()
    states = []
    for i, (tr, result) in enumerate(zip(started, results)):
        try:
            states.append(_tell_member(ctx, tr, result))
        except BaseException as e:  # interrupted while closing: no trial may be left RUNNING
            for later in started[i + 1:]:
                _close_trial_run(ctx, later, e)
                _tell(ctx, later.trial, FAIL, quiet=True)
            raise
    return states


@_reports_end
def _tell_member(ctx: StudyContext, tr: TrialRun, result: TrainResult) -> optuna.trial.TrialState:
    """Finish one trial of a lockstep group and tell Optuna how it ended."""
    e = result.stopped_by
    if e is not None:
        _close_trial_run(ctx, tr, e)
        state = PRUNED if isinstance(e, optuna.TrialPruned) else FAIL
        return state if _tell(ctx, tr.trial, state) else FAIL
    try:
        value = _finish_trial(ctx, tr, result)
    except BaseException as e2:
        _close_trial_run(ctx, tr, e2)
        _note_reason(tr.trial, "interrupted" if isinstance(e2, KeyboardInterrupt) else f"{type(e2).__name__}: {str(e2)[:200]}")
        _tell(ctx, tr.trial, FAIL, quiet=True)
        raise
    return COMPLETE if _tell(ctx, tr.trial, COMPLETE, value) else FAIL


def _claim_group(ctx: StudyContext) -> list[optuna.Trial]:
    """Up to --parallel trials for this worker: the first may wait for the study, the rest are claimed only if free."""
    first = _claim_next(ctx)
    group = [first] if first is not None else []
    while group and len(group) < ctx.cfg.parallel:
        t = _claim_next(ctx, wait=False)
        if t is None:
            break
        group.append(t)
    return group


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
    if problems and not (status == "FAILED" and failures.explain(problems[0])):
        why = failures.explain(problems[0]) or str(problems[0]).splitlines()[0][:200]
        ctx.say(f"warning: could not update MLflow at the end of the study: {scrub(why, ctx.tracker.uri)}")
    return best


def run_study(cfg: StudyConfig, say: Callable[[str], None] = print, reporter: Reporter | None = None) -> dict:
    """Run (or resume) the study until it has spent its budget (budget.py); return a summary."""
    reporter = reporter or Reporter.auto()
    if say is print:
        say = reporter.say  # flushed in logs, on stderr with --quiet
    check_pair(cfg)
    if cfg.full_study_name != cfg.requested_study_name:  # said once, before anything runs
        say(f"study name {cfg.requested_study_name!r} is stored as {cfg.full_study_name!r}")
    method_cls = get_method(cfg.method)
    device = resolve_device(cfg.device)
    cache, accel, perf_params = _perf_setup(cfg, device)
    storage = open_storage(cfg.storage)
    tracker = Tracker(cfg.tracking_uri)
    data = load_data(cfg.dataset, cfg.data_dir, cfg.data_size, cfg.seed, cfg.val_fraction, device, image_size=cfg.image_size)
    check_split(data, cfg.batch_size, cfg.val_fraction, say)  # before a teacher is trained on it
    split = fixed_inputs.split_record(data)
    _precheck(storage, cfg, split)

    teacher, teacher_info = (None, {})
    if method_cls.uses_teacher:
        teacher, teacher_info = get_teacher(cfg, data, tracker, say)

    name = cfg.full_study_name
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                sampler=make_sampler(cfg, 0), pruner=make_pruner(cfg))
    lock = StudyLock(storage.url, name)
    if not lock.exact:
        say(f"warning: no cross-worker lock for {redact(storage.url).split(':', 1)[0]} storage; several workers may "
            f"overshoot --trials (use SQLite on one host, or PostgreSQL)")
    exp = tracker.experiment(cfg.experiment_name, pair_tags(cfg))
    base_params = {"method": cfg.method, "study": name, "dataset": cfg.dataset, "teacher": cfg.teacher, "student": cfg.student,
                   "seed": cfg.seed, "data_size": data.n_train, "val_size": len(data.val_y), "test_size": len(data.test_y),
                   "val_fraction": cfg.val_fraction, "augment": data.augment.describe(), "device": device.type,
                   "teacher_checkpoint": teacher_info.get("path", ""), "teacher_val_acc": teacher_info.get("val_acc", ""),
                   "teacher_sha256": teacher_info.get("sha256", ""), **_model_params(cfg, data, teacher, teacher_info),
                   **perf_params, **data_provenance(data)}
    with lock:  # one parent run, however many workers start at once
        _check_resume(study, cfg)
        fixed_inputs.check_and_record(study, split, fixed_inputs.teacher_record(teacher_info))
        store_agreement.check_name(study, cfg.requested_study_name, name)
        parent = _parent_run(tracker, exp, study, cfg, base_params, say)
    interval, grace = storage.heartbeat_interval, storage.grace_period
    ctx = StudyContext(cfg, data, teacher, teacher_info, tracker, exp, parent, say, base_params,
                       study=study, storage=storage, lock=lock, owner=Owner.me(), heartbeat=interval, grace=grace,
                       cache=cache, accel=accel, reporter=reporter)
    try:
        _close_orphan_runs(ctx, finished_too=True)
    except BaseException as e:  # the parent was just reopened: not left RUNNING by a store that fails here
        _finish(ctx, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise

    budget, now = cfg.budget, spent(study)
    if budget.done(now):
        say(f"Study {name!r} has spent its budget of {budget.describe()} ({budget.spent_text(now)}); nothing to run.")
    elif now.running:
        say(f"Joining study {name!r}: {budget.spent_text(now)} of {budget.describe()}, {now.running} running elsewhere "
            f"(or left by a dead worker: recovered when claiming).")
    elif study.trials:
        say(f"Resuming study {name!r}: {budget.spent_text(now)} of {budget.describe()}.")
    done, total = budget.progress(now)
    unit = "epoch" if total == cfg.budget_epochs else "trial"
    reporter.study_start(name, f"{cfg.method}, {cfg.epochs}-epoch trials, budget {budget.describe()}; "
                               f"spent so far: {budget.spent_text(now)}")
    bar = tqdm(total=total, initial=done, desc=cfg.method, unit=unit, disable=not reporter.bars)
    # A run of failures that train nothing (a bug, a broken store) must not loop forever.
    max_failures = cfg.trials if cfg.trials is not None else math.ceil(cfg.budget_epochs / cfg.epochs)
    start, failures, status = time.monotonic(), 0, "FINISHED"
    try:
        while True:
            if cfg.timeout is not None and time.monotonic() - start > cfg.timeout:
                say(f"--timeout {cfg.timeout:g}s reached; run the same command again to continue.")
                break
            check_stop()
            group = _claim_group(ctx)
            if not group:
                break
            states = [_execute(ctx, group[0])] if len(group) == 1 else _execute_group(ctx, group)
            failures += states.count(FAIL)
            if failures > max_failures:
                raise UserError(f"{failures} trials failed in this run (see the FAIL runs' kdsweep.reason tags in MLflow); stopping")
            now = spent(study)
            bar.n = budget.progress(now)[0]
            c = now.by_state.get("COMPLETE", 0)
            best = best_trial(study.get_trials(deepcopy=False)).value if c else float("nan")
            bar.set_postfix_str(f"done={c} pruned={now.by_state.get('PRUNED', 0)} failed={count(study, FAIL)} "
                                f"epochs={now.epochs} best_val={best:.4f}")
            bar.refresh()
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        bar.close()
        best = _finish(ctx, status)
        lock.close()

    now = spent(study)
    return {"study": name, "storage": redact(storage.url if hasattr(storage, "url") else str(cfg.storage)),
            "tracking_uri": redact(tracker.uri), "experiment": cfg.experiment_name, "experiment_id": exp, "parent_run": parent,
            "complete": count(study, COMPLETE), "pruned": count(study, PRUNED), "failed": count(study, FAIL), "best": best,
            "trained": now.trials, "epochs": now.epochs, "budget": budget.describe(),
            "edges": edge_warnings(best["params"], cfg.space) if best else [],
            "teacher": teacher_info, "teacher_cache": cache.stats()}
