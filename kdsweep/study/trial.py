"""One trial's life: sample its parameters, open its MLflow run, train it (alone, or K in lockstep with
--parallel, from one study or several of a sweep), record its result, and end it through outcome.end_trial.

The shape is Optuna's `_run_trial`: one `try` around the training catches whatever stops it,
`outcome.classify` maps that to a row of the outcome table, and one writer records the end.
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import torch

from kdsweep.common.bars import tqdm
from kdsweep.common.locks import StudyLock
from kdsweep.common.processes import Owner
from kdsweep.data.device_data import DeviceData
from kdsweep.methods.registry import get_method
from kdsweep.models import factory
from kdsweep.models.zoo import Shapes, count_params
from kdsweep.study import outcome as oc
from kdsweep.study.config import StudyConfig
from kdsweep.study.progress import Reporter
from kdsweep.study.pruning import Completed, Reports, in_memory, should_prune
from kdsweep.study.workers import Heartbeat, check_stop
from kdsweep.tracking.tracker import Curves, Tracker
from kdsweep.tracking.vocabulary import RUN_ID_ATTR, STATE_RUNNING, STATE_TAG
from kdsweep.training import checkpoint, teacher_outputs
from kdsweep.training.devices import Accel
from kdsweep.training.loop import Member, Schedule, TrainResult, evaluate, train_student, train_students


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
    # Worker coordination (see workers.py); set by loop.run_studies.
    study: optuna.Study | None = None
    storage: optuna.storages.RDBStorage | None = None
    lock: StudyLock | None = None
    owner: Owner | None = None
    heartbeat: int = 10
    grace: int = 60
    poll: float = 2.0  # seconds between looks at the store while every open study's budget is reserved elsewhere
    # The device path (see training/loop.py, teacher_outputs.py); set by loop.run_studies.
    cache: teacher_outputs.TeacherCache | None = None  # teacher outputs shared by the study's trials
    accel: Accel | None = None
    teacher_shapes: Shapes | None = None  # the frozen teacher's tap shapes: one dry forward per study, not per trial
    reporter: Reporter = field(default_factory=Reporter.auto)  # bars, log lines or nothing (progress.py)

    def __post_init__(self):
        if self.teacher is not None and self.teacher_shapes is None:
            self.teacher_shapes = self.teacher.shapes(self.data.in_shape)

    def records(self, trial: optuna.Trial, run: str | None = None) -> oc.Records:
        """Where one of the study's trials is recorded, for outcome.end_trial."""
        line = (lambda frozen: self.reporter.trial_end(self.cfg.name, frozen)) if self.reporter.lines else None
        return oc.Records(self.tracker, run, trial, say=self.say, line=line)


def trial_params(ctx: StudyContext, trial: optuna.Trial) -> dict[str, float]:
    """The trial's hyperparameters: the fixed ones and a draw from the search space."""
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
    completed: Completed | None = None  # the study's complete trials as its pruner compares with them (pruning.py)
    curves: Curves | None = None  # its epochs' metrics on their way to MLflow
    reports: Reports | None = None  # its epochs' val_acc on their way to Optuna
    curve: dict[int, float] = field(default_factory=dict)  # val_acc per epoch, as reported to Optuna
    seconds: float = 0.0  # training wall time so far
    ending: bool = False  # its end is being or has been written (never twice)
    outcome: oc.Outcome | None = None  # how it ended, once written

    @property
    def reported(self) -> list[int]:
        return list(self.curve)


def _open(ctx: StudyContext, trial: optuna.Trial) -> TrialRun:
    """Sample the trial's parameters, build its student and heads, and create its MLflow run (the last step)."""
    cfg, data = ctx.cfg, ctx.data
    method_cls = get_method(cfg.method)
    hp = trial_params(ctx, trial)
    schedule = Schedule(cfg.epochs, cfg.batch_size, hp["lr"], cfg.momentum, cfg.weight_decay, cfg.optimizer)
    torch.manual_seed(cfg.seed)  # every trial starts from the same student initialisation
    student = factory.build_for(cfg, "student", data.in_shape, data.num_classes).to(data.device)
    s_shapes = student.shapes(data.in_shape)
    method = method_cls({k: v for k, v in hp.items() if k != "lr"}, s_shapes, ctx.teacher_shapes, cfg.epochs).to(data.device)
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state(data.device) if data.device.type == "cuda" else None)
    completed = Completed(ctx.study) if ctx.study is not None and in_memory(ctx.study.pruner) else None
    # Named for its study's label and per-trial settings first: in a flat list of trials (sorted by the
    # objective) 'vanilla_kd e5-b32 t002' and 'vanilla_kd e3-b32 t002' stay apart; the table cuts long names.
    run = ctx.tracker.start(ctx.experiment_id, f"{cfg.name} {cfg.budget_tag} t{trial.number:03d}",
                            {"kdsweep.role": "trial", "kdsweep.method": cfg.method, "kdsweep.study": cfg.full_study_name,
                             "kdsweep.label": cfg.name, "kdsweep.per_trial": cfg.budget_tag,
                             "kdsweep.trial": trial.number, STATE_TAG: STATE_RUNNING}, parent=ctx.parent_run)
    return TrialRun(trial, hp, schedule, student, method, run, rng, completed, Curves(ctx.tracker, run),
                    Reports(trial, at_once=completed is None))


def _fill(ctx: StudyContext, tr: TrialRun) -> None:
    """Link the trial and its run both ways and log the run's parameters."""
    tr.trial.set_user_attr(RUN_ID_ATTR, tr.run)
    params = {**ctx.base_params, **tr.hp, **vars(tr.schedule), "extra_params": count_params(tr.method)}
    ctx.tracker.log(tr.run, params=params)


def _epoch_callback(ctx: StudyContext, tr: TrialRun) -> Callable:
    def on_epoch(stats):
        check_stop()
        tr.curves.add(stats.epoch, stats.metrics())
        tr.seconds += stats.seconds
        tr.reports.add(stats.epoch, stats.val_acc)
        tr.curve[stats.epoch] = stats.val_acc
        if should_prune(tr.trial, tr.curve, tr.completed):
            raise optuna.TrialPruned(f"pruned after epoch {stats.epoch + 1} of {ctx.cfg.epochs}")  # 1-based for people

    return on_epoch


def record_result(tracker: Tracker, run: str, data: DeviceData, arch: str, student: torch.nn.Module, method: torch.nn.Module,
                  result: TrainResult, meta: dict[str, Any], accel: Accel | None = None) -> dict[str, float]:
    """Evaluate the selected (best-val) epoch on test, log its checkpoint and final metrics (outcome.end_trial ends the run)."""
    student.load_state_dict(result.state["student"])
    method.load_state_dict(result.state["heads"])
    test_loss, test_acc = evaluate(student, data, "test", accel)
    final = {"best_val_acc": result.best_val_acc, "best_epoch": result.best_epoch, "test_acc": test_acc, "test_loss": test_loss}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint.save(Path(tmp) / "student.pt", arch, data.in_shape, data.num_classes, result.state,
                               {**meta, "best_epoch": result.best_epoch, "val_acc": result.best_val_acc, "test_acc": test_acc})
        tracker.client.log_artifact(run, str(ckpt), "checkpoint")
    tracker.log(run, final, step=result.best_epoch)
    return final


def _complete(ctx: StudyContext, tr: TrialRun, result: TrainResult) -> oc.Ending:
    """Record a trial that trained to the end; what its end records (its value is the best val acc)."""
    cfg = ctx.cfg
    final = record_result(ctx.tracker, tr.run, ctx.data, cfg.student, tr.student, tr.method, result,
                          {"method": cfg.method, "study": cfg.full_study_name, "trial": tr.trial.number, "hparams": tr.hp},
                          ctx.accel)
    return oc.Ending(epochs=len(result.history), seconds=tr.seconds, value=result.best_val_acc,
                     attrs={k: final[k] for k in ("test_acc", "best_epoch")})


def ending(tr: TrialRun | None, error: BaseException) -> oc.Ending:
    """What a trial that stopped with `error` records: the epochs it trained, and where it stopped."""
    if tr is None:
        return oc.Ending(error=error)
    row = oc.classify(error)
    if row is oc.PRUNED:
        return oc.Ending(error=error, epochs=len(tr.reported), seconds=tr.seconds,
                         tags={"kdsweep.pruned_at_epoch": tr.reported[-1] if tr.reported else -1})
    if row in (oc.DIVERGED, oc.OUT_OF_MEMORY):  # it trained until it diverged (or ran out of memory): it counts
        epoch = getattr(error, "epoch", len(tr.reported))  # an OOM: the epoch it was in
        return oc.Ending(error=error, epochs=epoch + 1, seconds=tr.seconds, attrs={"failed_at_epoch": epoch},
                         tags={"kdsweep.failed_at_epoch": epoch})
    return oc.Ending(error=error, epochs=len(tr.reported), seconds=tr.seconds)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _end(ctx: StudyContext, trial: optuna.Trial, tr: TrialRun | None, end: oc.Ending) -> oc.Outcome:
    """End one trial through the outcome table; the epochs' metrics not yet in MLflow or Optuna go with its end."""
    if tr is not None:
        end.history, end.reports = tr.curves.take(), tr.reports.take()
    return oc.end_trial(ctx.records(trial, tr.run if tr else None), oc.classify(end.error), end)


def execute(ctx: StudyContext, trial: optuna.Trial) -> oc.Outcome:
    """Train one claimed trial alone, with a heartbeat, and record its end; a bad trial does not stop the study."""
    tr, end = None, None
    bar = tqdm(total=ctx.cfg.epochs, desc=f"trial {trial.number}", unit="epoch", leave=False, disable=not ctx.reporter.bars)
    try:
        with Heartbeat(ctx.storage, trial._trial_id, ctx.heartbeat):
            tr = _open(ctx, trial)
            _fill(ctx, tr)
            result = train_student(tr.student, tr.method, ctx.teacher, ctx.data, tr.schedule, on_epoch=_epoch_callback(ctx, tr),
                                   progress=lambda e: bar.update(1), cache=ctx.cache, accel=ctx.accel)
            end = _complete(ctx, tr, result)
    except BaseException as e:
        end = ending(tr, e)
    finally:
        bar.close()
    outcome = _end(ctx, trial, tr, end)
    if not oc.classify(end.error).goes_on:
        raise end.error
    if outcome is oc.OUT_OF_MEMORY:
        end = None  # its traceback holds the tensors: give the next trial the memory back
        _free_memory(ctx.data.device)
    return outcome


Entry = tuple[StudyContext, optuna.Trial]  # a claimed trial and the study it belongs to


def _shared(entries: list[Entry]) -> tuple[DeviceData, torch.nn.Module | None, StudyContext]:
    """What the members of a group share: one data split and one teacher (a sweep opens them once: loop.Shared)."""
    first = entries[0][0]
    teachers = {id(c.teacher): c.teacher for c, _ in entries if c.teacher is not None}
    if any(c.data is not first.data for c, _ in entries) or len(teachers) > 1:
        raise ValueError("a lockstep group's trials must share their data split and teacher")
    return first.data, next(iter(teachers.values()), None), first


def _ending_when_pruned(ctx: StudyContext, tr: TrialRun, beat: Heartbeat) -> Callable:
    """A group member's epoch callback that ends its trial as soon as it is pruned, not when its group ends:
    its budget frees at once for the other workers, `kdsweep status` shows it pruned, and a kill -9 later
    in the group cannot turn a decided trial into a lost one."""
    on_epoch = _epoch_callback(ctx, tr)

    def on_epoch_then_end(stats):
        try:
            on_epoch(stats)
        except optuna.TrialPruned as e:
            beat.stop()  # an ended trial takes no more beats
            tr.ending = True
            tr.outcome = _end(ctx, tr.trial, tr, ending(tr, e))
            raise  # the group drops the member

    return on_epoch_then_end


def _train_group(entries: list[Entry], started: list[TrialRun]) -> list[TrainResult]:
    """Open every trial's run (into `started`) and train them in lockstep, each with its heartbeat."""
    data, teacher, first = _shared(entries)
    numbers = ", ".join(f"{c.cfg.name} {t.number}" for c, t in entries)
    bar = tqdm(total=first.cfg.epochs, desc=f"trials {numbers}"[:60], unit="epoch", leave=False,
               disable=not first.reporter.bars)
    try:
        with contextlib.ExitStack() as beats:
            hearts = [beats.enter_context(Heartbeat(ctx.storage, t._trial_id, ctx.heartbeat)) for ctx, t in entries]
            for ctx, t in entries:
                started.append(_open(ctx, t))
                _fill(ctx, started[-1])
            members = [Member(tr.student, tr.method, tr.schedule, _ending_when_pruned(ctx, tr, beat), rng=tr.rng)
                       for (ctx, _), tr, beat in zip(entries, started, hearts)]
            return train_students(members, teacher, data, cache=first.cache, accel=first.accel,
                                  progress=lambda e: bar.update(1), stop_on=(optuna.TrialPruned,))
    finally:
        bar.close()


def execute_group(entries: list[Entry]) -> list[oc.Outcome]:
    """Train claimed trials in lockstep on the same batches (--parallel; in a sweep, trials of several methods'
    studies together); each reports, prunes and ends on its own, in its own study: a pruned member in the
    epoch it is pruned, the others when the group has trained.

    An exception that stops the whole group (an out-of-memory error, Ctrl-C, a bug) ends every member
    not ended yet with the same row of the outcome table as it would end a lone trial.
    """
    started: list[TrialRun] = []
    error = None
    try:
        results = _train_group(entries, started)
    except BaseException as e:
        error = e
    if error is not None:
        return _end_stopped_group(entries, started, error)
    outcomes: list[oc.Outcome] = []
    for i, ((ctx, _), tr, result) in enumerate(zip(entries, started, results)):
        if tr.ending:  # pruned, and ended then
            outcomes.append(tr.outcome)
            continue
        try:
            end = ending(tr, result.stopped_by) if result.stopped_by is not None else _complete(ctx, tr, result)
        except BaseException as e:
            end = ending(tr, e)
        try:
            outcomes.append(_end(ctx, tr.trial, tr, end))
        except KeyboardInterrupt as e:  # landed while this one was being recorded (end_trial recorded what it could)
            end = oc.Ending(error=e)
        if not oc.classify(end.error).goes_on:  # interrupted while closing: no trial may be left RUNNING
            for (later_ctx, _), later in zip(entries[i + 1:], started[i + 1:]):
                if not later.ending:
                    _end(later_ctx, later.trial, later, oc.Ending(error=end.error, epochs=len(later.reported)))
            raise end.error
    return outcomes


def _end_stopped_group(entries: list[Entry], started: list[TrialRun], error: BaseException) -> list[oc.Outcome]:
    """End every member of a group that `error` stopped, each as a lone trial stopped by it would end
    (a member pruned before it was ended then)."""
    runs = {id(tr.trial): tr for tr in started}
    outcomes = []
    for ctx, t in entries:
        tr = runs.get(id(t))
        if tr is not None and tr.ending:
            outcomes.append(tr.outcome or oc.classify(error))  # None: `error` landed while its end was written
        else:
            outcomes.append(_end(ctx, t, tr, ending(tr, error)))
    if not oc.classify(error).goes_on:
        raise error
    if oc.OUT_OF_MEMORY in outcomes:
        del error  # its traceback holds the tensors: give the next trials the memory back
        _free_memory(entries[0][0].data.device)
    return outcomes
