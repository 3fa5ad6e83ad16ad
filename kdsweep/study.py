"""One Optuna study for one distillation method, every trial tracked as a nested MLflow run.

Order of work, chosen so a bad input fails before anything is written:
config -> device -> Optuna storage -> MLflow store -> data -> pair check ->
teacher -> study + parent run -> trials.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
from tqdm.auto import tqdm

from . import checkpoint, teacher_cache
from .config import StudyConfig
from .data import DeviceData, load_data
from .errors import UserError
from .methods import get_method
from .models import build_model, count_params
from .teacher import get_teacher
from .tracking import DEFAULT_DIR, Tracker, redact
from .train import Accel, Member, NonFiniteLoss, Schedule, TrainResult, evaluate, set_cpu_threads, train_student, train_students

optuna.logging.set_verbosity(optuna.logging.WARNING)

RUN_ID_ATTR = "mlflow_run_id"
PARENT_ATTR = "mlflow_parent_run_id"
CONFIG_ATTR = "kdsweep_config"
# Exceptions that end one trial (recorded as FAIL) but not the study.
TRIAL_ERRORS = (NonFiniteLoss, torch.cuda.OutOfMemoryError)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available (use --device cpu or auto)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def default_storage() -> str:
    # Its own SQLite file: Optuna and MLflow must not share one (both run alembic migrations).
    return f"sqlite:///{(DEFAULT_DIR / 'optuna.db').as_posix()}"


def open_storage(url: str | None) -> optuna.storages.BaseStorage:
    url = url or default_storage()
    if url.startswith("sqlite:///"):
        db = Path(url[len("sqlite:///"):])
        if not db.parent.is_dir():
            if db.parent == DEFAULT_DIR:
                db.parent.mkdir(parents=True)
            else:
                raise UserError(f"storage {url}: directory {db.parent} does not exist")
    try:
        return optuna.storages.RDBStorage(url, heartbeat_interval=None)
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot open Optuna storage {redact(url)}: {msg}") from None


def make_sampler(cfg: StudyConfig, n_existing: int) -> optuna.samplers.BaseSampler:
    # Offset the seed by the trials already run, so a resumed random/startup phase does not replay them.
    seed = cfg.seed + n_existing
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        # Five full trials set the bar; no trial is judged on its first epoch alone.
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.epochs)
    return optuna.pruners.NopPruner()


def count(study: optuna.Study, state: optuna.trial.TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=(state,)))


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
    cache: teacher_cache.TeacherCache | None = None  # teacher outputs shared by the study's trials
    accel: Accel | None = None


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
    reported: int = 0  # epochs reported to Optuna (optuna.Trial has no intermediate_values)


def _start_trial(ctx: StudyContext, trial: optuna.Trial) -> TrialRun:
    """Sample the trial's parameters, build its student and heads, open and fill its MLflow run."""
    cfg, data, tracker = ctx.cfg, ctx.data, ctx.tracker
    method_cls = get_method(cfg.method)
    hp = _trial_params(ctx, trial)
    schedule = Schedule(cfg.epochs, cfg.batch_size, hp["lr"], cfg.momentum, cfg.weight_decay)
    torch.manual_seed(cfg.seed)  # every trial starts from the same student initialisation
    student = build_model(cfg.student, data.in_shape, data.num_classes).to(data.device)
    s_shapes = student.shapes(data.in_shape)
    t_shapes = ctx.teacher.shapes(data.in_shape) if ctx.teacher is not None else None
    method = method_cls({k: v for k, v in hp.items() if k != "lr"}, s_shapes, t_shapes, cfg.epochs).to(data.device)
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state(data.device) if data.device.type == "cuda" else None)

    run = tracker.start(ctx.experiment_id, f"{cfg.full_study_name}/t{trial.number:03d}",
                        {"kdsweep.role": "trial", "kdsweep.method": cfg.method, "kdsweep.study": cfg.full_study_name,
                         "kdsweep.trial": trial.number, "kdsweep.state": "RUNNING"}, parent=ctx.parent_run)
    trial.set_user_attr(RUN_ID_ATTR, run)
    params = {**ctx.base_params, **hp, **{k: v for k, v in vars(schedule).items()}, "extra_params": count_params(method)}
    tracker.log(run, params=params)
    return TrialRun(trial, hp, schedule, student, method, run, rng)


def _epoch_callback(ctx: StudyContext, tr: TrialRun) -> Callable:
    def on_epoch(stats):
        ctx.tracker.log(tr.run, stats.metrics(), step=stats.epoch)
        tr.trial.report(stats.val_acc, stats.epoch)
        tr.reported = stats.epoch + 1
        if tr.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {stats.epoch}")

    return on_epoch


def _close_trial_run(ctx: StudyContext, tr: TrialRun, e: BaseException) -> None:
    """Tag and end a trial's MLflow run that stopped with `e` (pruned, failed or interrupted)."""
    tracker, run, trial = ctx.tracker, tr.run, tr.trial
    if isinstance(e, optuna.TrialPruned):
        tracker.log(run, tags={"kdsweep.state": "PRUNED", "kdsweep.pruned_at_epoch": tr.reported - 1, "kdsweep.reason": str(e)})
        tracker.end(run, "KILLED")
    elif isinstance(e, TRIAL_ERRORS):
        epoch = getattr(e, "epoch", tr.reported)
        tracker.log(run, tags={"kdsweep.state": "FAIL", "kdsweep.reason": str(e).splitlines()[0][:250], "kdsweep.failed_at_epoch": epoch})
        trial.set_user_attr("fail_reason", str(e).splitlines()[0][:250])
        tracker.end(run, "FAILED")
    elif isinstance(e, KeyboardInterrupt):
        tracker.log(run, tags={"kdsweep.state": "FAIL", "kdsweep.reason": "interrupted"})
        tracker.end(run, "KILLED")
    else:
        tracker.log(run, tags={"kdsweep.state": "FAIL", "kdsweep.reason": f"{type(e).__name__}: {str(e)[:200]}"})
        tracker.end(run, "FAILED")


def _finish_trial(ctx: StudyContext, tr: TrialRun, result: TrainResult) -> float:
    """Evaluate the selected (best-val) epoch on test, log the checkpoint and final metrics; return best val acc."""
    cfg, data, tracker, trial = ctx.cfg, ctx.data, ctx.tracker, tr.trial
    student, method = tr.student, tr.method
    student.load_state_dict(result.state["student"])
    method.load_state_dict(result.state["heads"])
    test_loss, test_acc = evaluate(student, data, "test")
    final = {"best_val_acc": result.best_val_acc, "best_epoch": result.best_epoch, "test_acc": test_acc, "test_loss": test_loss,
             "train_seconds": sum(s.seconds for s in result.history)}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint.save(Path(tmp) / "student.pt", cfg.student, data.in_shape, data.num_classes, result.state,
                               {"method": cfg.method, "study": cfg.full_study_name, "trial": trial.number, "hparams": tr.hp,
                                "best_epoch": result.best_epoch, "val_acc": result.best_val_acc, "test_acc": test_acc})
        tracker.client.log_artifact(tr.run, str(ckpt), "checkpoint")
    tracker.log(tr.run, final, tags={"kdsweep.state": "COMPLETE"}, step=result.best_epoch)
    tracker.end(tr.run)
    for k in ("test_acc", "best_epoch"):
        trial.set_user_attr(k, final[k])
    return result.best_val_acc


def run_trial(ctx: StudyContext, trial: optuna.Trial) -> float:
    tr = _start_trial(ctx, trial)
    bar = tqdm(total=ctx.cfg.epochs, desc=f"trial {trial.number}", unit="epoch", leave=False, disable=None)
    try:
        result = train_student(tr.student, tr.method, ctx.teacher, ctx.data, tr.schedule, on_epoch=_epoch_callback(ctx, tr),
                               progress=lambda e: bar.update(1), cache=ctx.cache, accel=ctx.accel)
    except BaseException as e:
        _close_trial_run(ctx, tr, e)
        raise
    finally:
        bar.close()
    return _finish_trial(ctx, tr, result)


def run_trials_lockstep(ctx: StudyContext, study: optuna.Study, k: int) -> None:
    """Ask Optuna for k trials, train their students together on the same batches, tell each its own outcome.

    Each trial reports (and may be pruned) after every epoch on its own; a
    pruned or diverged trial leaves the group and the others carry on.
    """
    FAIL = optuna.trial.TrialState.FAIL
    trials = [study.ask() for _ in range(k)]
    started: list[TrialRun] = []
    bar = tqdm(total=ctx.cfg.epochs, desc=f"trials {trials[0].number}-{trials[-1].number}", unit="epoch", leave=False, disable=None)
    try:
        for t in trials:
            started.append(_start_trial(ctx, t))
        members = [Member(tr.student, tr.method, tr.schedule, _epoch_callback(ctx, tr), rng=tr.rng) for tr in started]
        results = train_students(members, ctx.teacher, ctx.data, cache=ctx.cache, accel=ctx.accel,
                                 progress=lambda e: bar.update(1), stop_on=(optuna.TrialPruned,))
    except BaseException as e:  # the whole group stops: every trial is closed and told
        for tr in started:
            _close_trial_run(ctx, tr, e)
        for t in trials:
            study.tell(t, state=FAIL)
        if isinstance(e, TRIAL_ERRORS):
            return
        raise
    finally:
        bar.close()
    for i, (tr, result) in enumerate(zip(started, results)):
        try:
            _tell_lockstep(ctx, study, tr, result)
        except BaseException as e:  # interrupted while closing: no trial may be left RUNNING
            for later in started[i + 1:]:
                _close_trial_run(ctx, later, e)
                study.tell(later.trial, state=FAIL)
            raise


def _tell_lockstep(ctx: StudyContext, study: optuna.Study, tr: TrialRun, result: TrainResult) -> None:
    """Finish one trial of a lockstep group and tell Optuna how it ended."""
    e = result.stopped_by
    if e is not None:
        _close_trial_run(ctx, tr, e)
        pruned = isinstance(e, optuna.TrialPruned)
        study.tell(tr.trial, state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.FAIL)
        return
    try:
        value = _finish_trial(ctx, tr, result)
    except BaseException as e2:
        _close_trial_run(ctx, tr, e2)
        study.tell(tr.trial, state=optuna.trial.TrialState.FAIL)
        raise
    study.tell(tr.trial, value)


def _run_next(ctx: StudyContext, study: optuna.Study) -> None:
    """Run the next trial, or the next lockstep group of --parallel trials."""
    k = min(ctx.cfg.parallel, ctx.cfg.trials - count(study, optuna.trial.TrialState.COMPLETE))
    if k > 1:
        run_trials_lockstep(ctx, study, k)
    else:
        study.optimize(lambda t: run_trial(ctx, t), n_trials=1, catch=TRIAL_ERRORS, gc_after_trial=False)


def _perf_setup(cfg: StudyConfig, device: torch.device) -> tuple[teacher_cache.TeacherCache, Accel, dict[str, Any]]:
    """The device path of a study: CPU threads, the shared teacher cache, memory format, compile; and their params."""
    threads = set_cpu_threads() if device.type == "cpu" else None
    cache = teacher_cache.shared(cfg.teacher_cache_mb, device)
    accel = Accel(channels_last=cfg.channels_last, compile=cfg.compile, cpu_workers=cfg.cpu_workers)
    params = {"parallel": cfg.parallel, "teacher_cache_mb": round(cache.budget / 2**20, 1), "channels_last": cfg.channels_last,
              "compile": cfg.compile, "cpu_threads": threads or "",
              "cpu_workers": "" if device.type != "cpu" else cfg.cpu_workers if cfg.cpu_workers is not None else "auto"}
    return cache, accel, params


def _check_resume(study: optuna.Study, cfg: StudyConfig) -> None:
    old = study.user_attrs.get(CONFIG_ATTR)
    new = cfg.fingerprint()
    if old is None:
        study.set_user_attr(CONFIG_ATTR, new)
        return
    diff = [k for k in new if old.get(k) != new[k]]
    if diff:
        changes = "; ".join(f"{k}: {old.get(k)} -> {new[k]}" for k in diff)
        raise UserError(f"study {cfg.full_study_name!r} exists with other settings ({changes}); "
                        f"use the original settings to resume, or --study-name NEW for a new study")


def _parent_run(tracker: Tracker, exp: str, study: optuna.Study, cfg: StudyConfig, base_params: dict) -> str:
    run = study.user_attrs.get(PARENT_ATTR)
    if run:
        try:
            tracker.client.get_run(run)
        except Exception:
            run = None
    run = run or tracker.find_run(exp, {"kdsweep.role": "study", "kdsweep.study": cfg.full_study_name})
    if run is None:
        run = tracker.start(exp, cfg.full_study_name, {"kdsweep.role": "study", "kdsweep.study": cfg.full_study_name,
                                                       "kdsweep.method": cfg.method})
        space = {f"space.{k}": v.describe() for k, v in cfg.space.items()}
        tracker.log(run, params={**base_params, **space, **{f"fixed.{k}": v for k, v in cfg.fixed.items()},
                                 "sampler": cfg.sampler, "pruner": cfg.pruner})
        study.set_user_attr(PARENT_ATTR, run)
    else:
        tracker.client.update_run(run, status="RUNNING")
    return run


def _record_best(tracker: Tracker, parent: str, study: optuna.Study) -> dict | None:
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    counts = {s.name.lower(): count(study, s) for s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                                                        optuna.trial.TrialState.FAIL)}
    metrics = {f"trials_{k}": v for k, v in counts.items()}
    if not done:
        tracker.log(parent, metrics)
        return None
    best = study.best_trial
    metrics.update(best_val_acc=best.value, best_test_acc=best.user_attrs.get("test_acc", math.nan), best_trial=best.number)
    # Params are immutable in MLflow, but the best trial changes as a study grows: metrics and tags instead.
    metrics.update({f"best.{k}": v for k, v in best.params.items()})
    tags = {f"best.{k}": f"{v:.6g}" for k, v in best.params.items()}
    tags["best.run_id"] = best.user_attrs.get(RUN_ID_ATTR, "")
    tracker.log(parent, metrics, tags=tags, step=len(study.trials))
    return {"number": best.number, "val_acc": best.value, "test_acc": best.user_attrs.get("test_acc"),
            "params": best.params, "run_id": best.user_attrs.get(RUN_ID_ATTR)}


def run_study(cfg: StudyConfig, say: Callable[[str], None] = print) -> dict:
    """Run (or resume) the study until it holds cfg.trials complete trials; return a summary."""
    method_cls = get_method(cfg.method)
    device = resolve_device(cfg.device)
    cache, accel, perf_params = _perf_setup(cfg, device)
    storage = open_storage(cfg.storage)
    tracker = Tracker(cfg.tracking_uri)
    data = load_data(cfg.dataset, cfg.data_dir, cfg.data_size, cfg.seed, cfg.val_fraction, device)

    s_shapes = build_model(cfg.student, data.in_shape, data.num_classes).shapes(data.in_shape)
    t_model = build_model(cfg.teacher, data.in_shape, data.num_classes)
    why = method_cls.unsupported(s_shapes, t_model.shapes(data.in_shape) if method_cls.uses_teacher else None)
    if why:
        raise UserError(f"{why}; {cfg.teacher} -> {cfg.student} cannot serve it (choose another --teacher/--student)")

    teacher, teacher_info = (None, {})
    if method_cls.uses_teacher:
        teacher, teacher_info = get_teacher(cfg, data, tracker, say)

    name = cfg.full_study_name
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                sampler=make_sampler(cfg, 0), pruner=make_pruner(cfg))
    _check_resume(study, cfg)
    study.sampler = make_sampler(cfg, len(study.trials))

    exp = tracker.experiment(cfg.experiment_name)
    base_params = {"method": cfg.method, "study": name, "dataset": cfg.dataset, "teacher": cfg.teacher, "student": cfg.student,
                   "seed": cfg.seed, "data_size": data.n_train, "val_size": len(data.val_y), "test_size": len(data.test_y),
                   "val_fraction": cfg.val_fraction, "augment": data.augment.describe(), "device": device.type,
                   "teacher_checkpoint": teacher_info.get("path", ""), "teacher_val_acc": teacher_info.get("val_acc", ""),
                   "student_params": count_params(build_model(cfg.student, data.in_shape, data.num_classes))}
    base_params.update(perf_params)
    parent = _parent_run(tracker, exp, study, cfg, base_params)
    ctx = StudyContext(cfg, data, teacher, teacher_info, tracker, exp, parent, say, base_params, cache, accel)

    COMPLETE, PRUNED, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL
    complete0 = count(study, COMPLETE)
    if complete0 >= cfg.trials:
        say(f"Study {name!r} already holds {complete0} complete trials (asked for {cfg.trials}); nothing to run.")
    bar = tqdm(total=cfg.trials, initial=min(complete0, cfg.trials), desc=cfg.method, unit="trial", disable=None)
    start, failures, status = time.monotonic(), 0, "FINISHED"
    try:
        while count(study, COMPLETE) < cfg.trials:
            if cfg.timeout is not None and time.monotonic() - start > cfg.timeout:
                say(f"--timeout {cfg.timeout:g}s reached; run the same command again to continue.")
                break
            before_fail = count(study, FAIL)
            _run_next(ctx, study)
            failures += count(study, FAIL) - before_fail
            if failures > cfg.trials:
                raise UserError(f"{failures} trials failed in this run (see the FAIL runs' kdsweep.reason tags in MLflow); stopping")
            c = count(study, COMPLETE)
            bar.n = min(c, cfg.trials)
            best = study.best_value if c else float("nan")
            bar.set_postfix_str(f"done={c} pruned={count(study, PRUNED)} failed={count(study, FAIL)} best_val={best:.4f}")
            bar.refresh()
    except BaseException:
        status = "KILLED"
        raise
    finally:
        bar.close()
        best = _record_best(tracker, parent, study)
        tracker.end(parent, status)

    return {"study": name, "storage": redact(storage.url if hasattr(storage, "url") else str(cfg.storage)),
            "tracking_uri": redact(tracker.uri), "experiment": cfg.experiment_name, "experiment_id": exp, "parent_run": parent,
            "complete": count(study, COMPLETE), "pruned": count(study, PRUNED), "failed": count(study, FAIL), "best": best,
            "teacher": teacher_info, "teacher_cache": cache.stats()}
