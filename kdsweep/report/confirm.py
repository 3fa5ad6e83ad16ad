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

Seed k of every method trains in one lockstep group (training/loop.py): the seeds share their split and
teacher, and seed k's batch stream is the same for every method, as a sweep's trials share theirs; so
their students step together (fused where it pays), each exactly as it would alone.

With `--processes N` (study/local_workers.py) the command runs as N worker processes: each claims its
share of every seed's studies (the rest it leaves to the others), then whatever no worker took, then
waits for the seeds its fellow workers train and counts them as the command's own. Seed k trains
the same split across processes as within one, so nothing but the wall time changes.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kdsweep.common import atomic
from kdsweep.common.errors import UserError
from kdsweep.common.locks import StudyLock
from kdsweep.common.processes import processes_here
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
from kdsweep.tracking.vocabulary import (
    REASON_TAG,
    RUN_FINISHED,
    RUN_RUNNING,
    STATE_COMPLETE,
    STATE_RUNNING,
    STATE_TAG,
)
from kdsweep.training.devices import Accel, prepare_cpu
from kdsweep.training.loop import Member, Schedule, TrainResult, train_students


def _existing(study: StudyRuns) -> dict[str, str]:
    """confirm_seed -> run id of the COMPLETE confirmation runs of the study's current best trial."""
    return {r.data.tags["kdsweep.confirm_seed"]: r.info.run_id for r in study.confirms}


def confirm(sel: Selection, seeds: int = 3, device: torch.device | str = "cpu", data_dir: str | None = None,
            say: Say = print, *, cpu_workers: int | None = None, quiet: bool = False) -> dict[str, dict[str, int]]:
    """Bring every selected study to `seeds` COMPLETE confirmation runs; return {label: {reused, trained, failed}}.

    `cpu_workers`: as a study's --cpu-workers; `quiet`: no progress lines (what was reused, each seed's result),
    only notes, warnings and failures."""
    progress: Say = (lambda msg: None) if quiet else say
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    device = torch.device(device)
    if device.type == "cpu":  # as the study's trials trained
        prepare_cpu(default=get_dataset(sel.dataset).cpu_threads)
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
    plans: list[_Plan] = []
    teacher = t_where = None
    with atomic.tmp_dir("kdsweep-confirm") as tmp:
        for s in todo:
            have = _existing(s)
            missing = [k for k in wanted if str(k) not in have]
            summary[s.label] = {"reused": len(wanted) - len(missing), "trained": 0, "failed": 0}
            if not missing:
                progress(f"{s.label}: {len(wanted)} confirmation runs already there (seeds {', '.join(map(str, wanted))}); reused")
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
            progress(f"{s.label}: {summary[s.label]['reused']} confirmation runs reused, to train: seeds "
                     f"{', '.join(map(str, missing))}")
            plans.append(_Plan(s, method_cls, teacher if method_cls.uses_teacher else None, t_shapes, data, missing,
                               summary[s.label]))
        _train_seeds(sel, plans, teacher, _Says(say, progress), Accel(cpu_workers=cpu_workers))
    return summary


@dataclass
class _Plan:
    """One study's seeds to train, and what they train with."""

    study: StudyRuns
    method_cls: type
    teacher: torch.nn.Module | None
    t_shapes: object
    data: object
    seeds: list[int]
    counts: dict[str, int]


@dataclass
class _Seed:
    """One confirmation run being trained."""

    plan: _Plan
    seed: int
    run: str
    member: Member
    curves: Curves
    hp: dict[str, float]


@dataclass
class _Says:
    """Where confirm's lines go: notes, warnings and failures (`say`), and progress (`progress`: nowhere with --quiet)."""

    say: Say
    progress: Say


def _train_seeds(sel: Selection, plans: list[_Plan], teacher, says: _Says, accel: Accel) -> None:
    """Seed by seed, claim the studies' runs of it (unless another confirm took one meanwhile) and train the claimed
    ones together, in one lockstep group per split and schedule; count what happened.

    One of N worker processes (--processes N) first claims one block of each seed's studies: the seed's studies cut
    into N blocks in a fixed order, a block claimed by claiming its first study, so the workers split every seed,
    the last one included, and the same studies train together in every run whichever worker comes first (a seed's
    groups are what its float rounding depends on: claimed one study at a time, the workers' claims interleaved
    when they asked at once, and a study of the same configuration moved 5 points in one seed). Then, in a second
    pass, it claims whatever is still unclaimed (a worker that never came, or died before claiming); then it waits
    for the seeds its fellow workers claimed."""
    locks = {p.study.name: StudyLock(sel.tracker.uri, f"confirm:{p.study.name}") for p in plans}
    workers = processes_here()
    todo = [(k, p) for k in sorted({k for p in plans for k in p.seeds}) for p in plans if k in p.seeds]
    taken: set[int] = set()  # positions in todo: trained here, reused, or left to a fellow worker
    fellows: list[tuple[_Plan, int, str]] = []  # seeds a fellow worker claimed: (plan, seed, run)

    def claim(i: int, k: int, groups: dict[tuple, list[_Seed]]) -> str:
        p = todo[i][1]
        taken.add(i)
        whose, run = _claim_seed(sel, p.study, k, locks[p.study.name], says.progress)
        if whose == _FELLOW:
            fellows.append((p, k, run))
        elif whose == _ELSEWHERE:
            p.counts["reused"] += 1
        else:
            seed = _prepare(sel, p, k, run, accel)
            sched = seed.member.schedule
            groups.setdefault((id(p.data), sched.epochs, sched.batch_size), []).append(seed)
        return whose

    try:
        for shared_out in ([True, False] if workers > 1 else [False]):
            for k in sorted({k for k, _ in todo}):
                of_k = [i for i, (kk, _) in enumerate(todo) if kk == k]
                size = math.ceil(len(of_k) / workers) if shared_out else len(of_k)
                groups: dict[tuple, list[_Seed]] = {}
                for block in (of_k[j:j + size] for j in range(0, len(of_k), size)):
                    if shared_out and (groups or block[0] in taken or claim(block[0], k, groups) != _MINE):
                        continue  # one block a seed in the first pass, and only a block whose first study was free
                    for i in block:
                        if i not in taken:
                            claim(i, k, groups)
                for seeds in groups.values():
                    _train_group(sel, seeds, teacher, says, accel)
    finally:
        for lock in locks.values():
            lock.close()
    _await_fellows(sel, fellows, says)


def _await_fellows(sel: Selection, fellows: list[tuple[_Plan, int, str]], says: _Says) -> None:
    """Wait for the seeds this command's other worker processes claimed; count each as this command's own."""
    if fellows:
        says.progress(f"  waiting for {len(fellows)} seed(s) that this command's other worker process(es) train")
    while fellows:
        left = []
        for p, k, run_id in fellows:
            run = sel.tracker.client.get_run(run_id)
            owner = cleanup.run_owner(run)
            if run.info.status == RUN_RUNNING and owner is not None and owner.alive() is not False:
                left.append((p, k, run_id))
                continue
            done = run.info.status == RUN_FINISHED and run.data.tags.get(STATE_TAG) == STATE_COMPLETE
            p.counts["trained" if done else "failed"] += 1
            if done:
                m = run.data.metrics
                says.progress(_result_line(p.study.label, k, m.get("best_val_acc"), m.get("test_acc"), run_id))
            elif run.info.status == RUN_RUNNING:
                says.say(f"  {p.study.label} seed {k}: its process {owner} is gone (killed or crashed); "
                         f"run `kdsweep confirm` again")
            else:
                says.say(f"  {p.study.label} seed {k}: {run.data.tags.get(REASON_TAG) or run.info.status}; recorded as FAIL")
        fellows = left
        if fellows:
            time.sleep(1.0)


def _result_line(label: str, seed: int, val_acc: float | None, test_acc: float | None, run: str) -> str:
    def acc(v: float | None) -> str:
        return "?" if v is None else f"{v:.4f}"
    return f"  {label} seed {seed}: val_acc={acc(val_acc)} test_acc={acc(test_acc)} (run {run})"


def _seed_runs(sel: Selection, s: StudyRuns, seed: int | None, statuses: tuple[str, ...]) -> list:
    """The confirmation runs of `s`'s current best trial (of one seed, unless None) in one of `statuses`."""
    tags = {"kdsweep.role": "confirm", "kdsweep.study": s.name, "kdsweep.source_run": s.best.info.run_id}
    if seed is not None:
        tags["kdsweep.confirm_seed"] = str(seed)
    return sel.tracker.find_runs(sel.experiment_id, tags, statuses=statuses)


_MINE, _FELLOW, _ELSEWHERE = "mine", "fellow", "elsewhere"  # who trains a seed: this process, another worker
# of this command (--processes), or another command (reused)


def _claim_seed(sel: Selection, s: StudyRuns, seed: int, lock: StudyLock, say: Say) -> tuple[str, str]:
    """Start seed `seed`'s run (its claim), unless another confirm trains or trained it since this one looked:
    (_MINE, the new run), or (_FELLOW or _ELSEWHERE, the other's run).

    Under the lock, so two `confirm`s at once share the seeds instead of both training each (the lock is
    released while a seed trains; on a store without one, claims can race, as a study's trials can)."""
    with lock:
        for run in _seed_runs(sel, s, seed, (RUN_RUNNING, RUN_FINISHED)):
            owner = cleanup.run_owner(run)
            fellow = owner is not None and owner.is_fellow()
            if run.info.status == RUN_FINISHED and run.data.tags.get(STATE_TAG) == STATE_COMPLETE:
                if fellow:
                    return _FELLOW, run.info.run_id  # this command's own: counted as trained
                say(f"  seed {seed}: trained meanwhile by another confirm (run {run.info.run_id}); reused")
                return _ELSEWHERE, run.info.run_id
            if run.info.status == RUN_RUNNING and owner is not None and owner.alive() is not False:
                if fellow:
                    return _FELLOW, run.info.run_id  # not news: this command's own, waited for at the end
                say(f"  seed {seed}: being trained by {owner} (run {run.info.run_id}); left to it")
                return _ELSEWHERE, run.info.run_id
        best = s.best
        tags = {"kdsweep.role": "confirm", "kdsweep.study": s.name, "kdsweep.method": s.method,
                "kdsweep.confirm_seed": seed, "kdsweep.source_run": best.info.run_id,
                "kdsweep.source_trial": best.data.tags.get("kdsweep.trial", ""), STATE_TAG: STATE_RUNNING,
                **cleanup.owner_tags()}
        # under the study's parent run, which names it
        return _MINE, sel.tracker.start(sel.experiment_id, f"confirm-s{seed}", tags, parent=s.run.info.run_id)


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


def _prepare(sel: Selection, p: _Plan, seed: int, run: str, accel: Accel) -> _Seed:
    """Seed `seed` of a study's best configuration: a fresh student (and heads) from that seed, its params logged."""
    best = p.study.best
    prm = best.data.params
    hp = {k: float(prm[k]) for k in [*p.method_cls.space, "lr"] if k in prm}
    schedule = Schedule(int(prm["epochs"]), int(prm["batch_size"]), hp["lr"], float(prm["momentum"]),
                        float(prm["weight_decay"]), prm.get("optimizer", "sgd"))  # runs from before the choice: SGD
    data = p.data
    torch.manual_seed(seed)  # fresh student (and head) initialisation
    student = build_model(p.study.params["student"], data.in_shape, data.num_classes,
                          **taps.recorded_paths(p.study.params, "student")).to(data.device)
    method = p.method_cls({k: v for k, v in hp.items() if k != "lr"}, student.shapes(data.in_shape), p.t_shapes,
                          schedule.epochs).to(data.device)
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state(data.device) if data.device.type == "cuda" else None)
    curves = Curves(sel.tracker, run)
    cpu_workers = ("auto" if accel.cpu_workers is None else accel.cpu_workers) if data.device.type == "cpu" else ""
    params = {**prm, "device": data.device.type, "confirm_seed": seed, "processes": processes_here(),
              "cpu_workers": cpu_workers, "source_trial": best.data.tags.get("kdsweep.trial", ""),
              "extra_params": count_params(method)}
    sel.tracker.log(run, params=params)
    member = Member(student, method, schedule, lambda st: curves.add(st.epoch, st.metrics()), rng=rng)
    return _Seed(p, seed, run, member, curves, hp)


def _train_group(sel: Selection, seeds: list[_Seed], teacher, says: _Says, accel: Accel) -> None:
    """Train seeds of several studies in lockstep (same split, schedule and seed: the same batches), then record
    and end each one's run on its own, as a lone seed's would be."""
    data = copy.copy(seeds[0].plan.data)
    data.stream_seed = seeds[0].seed  # same split, fresh batch order and augmentation
    try:
        results: list[TrainResult | BaseException] = list(train_students(
            [sd.member for sd in seeds], teacher if any(sd.plan.teacher is not None for sd in seeds) else None, data,
            accel=accel))
    except BaseException as e:  # noqa: BLE001 - it stopped the whole group: each seed ends with it
        results = [e] * len(seeds)
    stop = None
    for sd, result in zip(seeds, results):
        ok = _record(sel, sd, result, says)
        sd.plan.counts["trained" if ok else "failed"] += 1
        if isinstance(result, BaseException) and not outcome.classify(result).goes_on:
            stop = result
    if stop is not None:
        raise stop


def _record(sel: Selection, sd: _Seed, result: TrainResult | BaseException, says: _Says) -> bool:
    """Record one seed's result and end its run through the outcome table (MLflow side only: a seed has no
    Optuna trial); True if it completed."""
    s, data, final = sd.plan.study, sd.plan.data, None
    error = result if isinstance(result, BaseException) else result.stopped_by
    if error is None:
        try:
            final = record_result(sel.tracker, sd.run, data, s.params["student"], sd.member.student, sd.member.method,
                                  result, {"method": s.method, "study": s.name, "confirm_seed": sd.seed,
                                           "source_trial": s.best.data.tags.get("kdsweep.trial", ""), "hparams": sd.hp})
        except BaseException as e:  # noqa: BLE001 - recorded as this seed's end below
            error = e
    if error is None:
        end = outcome.Ending(epochs=len(result.history), seconds=sum(st.seconds for st in result.history))
    else:
        end = outcome.Ending(error=error)
    end.history = sd.curves.take()
    ended = outcome.end_trial(outcome.Records(sel.tracker, sd.run, say=says.say), outcome.classify(end.error), end)
    if ended is not outcome.COMPLETE:
        says.say(f"  {s.label} seed {sd.seed}: {outcome.reason_of(ended, end.error)}; recorded as FAIL")
        return False
    says.progress(_result_line(s.label, sd.seed, result.best_val_acc, final["test_acc"], sd.run))
    return True


def _close_dead(tracker, run: str, reason: str) -> None:
    """End a confirmation run whose process is gone, as a trial run of a lost worker ends."""
    outcome.end_trial(outcome.Records(tracker, run), outcome.WORKER_LOST, outcome.Ending(reason=reason))
