"""How a trial ends: one table of every way, one classifier, one writer.

Three vocabularies meet when a trial ends: Optuna's trial state, the MLflow run's status and the run's
`kdsweep.state` tag; and two policies: whether the trial counts toward the budget (budget.py) and whether
its parameters are tried again (workers.retry). `OUTCOMES` maps them all, one row per way a trial ends.

`classify(exception)` picks the row; `end_trial` writes it, and is the only code that sets a trial's
Optuna state or ends a trial's MLflow run, always in this order:

  1. the epochs' values Optuna's storage has not been sent yet (pruning.Reports), then Optuna user
     attributes: the reason, the results, and last the budget attribute (epochs trained), so a trial
     whose results could not be recorded does not count;
  2. Optuna state (the study's truth). If another worker already ended the trial (it failed it as
     stale), the outcome becomes STALE_WHILE_RUNNING;
  3. the MLflow run: the epochs' metrics it had not sent yet, its tags and budget metrics, then its status,
     written from the outcome actually recorded, so MLflow's `epochs_trained` and the report agree with
     the budget;
  4. the trial's progress line (progress.Reporter).

A crash between two steps leaves what the next start repairs: a RUNNING trial is failed as stale
(WORKER_LOST: its budget attribute cleared), and a run whose trial has ended is closed from Optuna's
record (loop._close_orphan_runs, through `end_trial` as well). An interrupt after step 2 stored the
state does not change the outcome: the run is closed as that state, then the interrupt goes on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsweep.common import failures
from kdsweep.study.pruning import write_reports
from kdsweep.tracking.vocabulary import (
    EPOCHS_ATTR,
    REASON_ATTR,
    REASON_TAG,
    RUN_FAILED,
    RUN_FINISHED,
    RUN_KILLED,
    STATE_COMPLETE,
    STATE_FAIL,
    STATE_ORPHANED,
    STATE_PRUNED,
    STATE_TAG,
)


@dataclass(frozen=True)
class Outcome:
    """One way a trial ends (a row of OUTCOMES)."""

    name: str
    optuna: TrialState | None  # the trial's Optuna state (None: a run no trial owns)
    status: str  # its MLflow run's status
    tag: str  # its run's kdsweep.state
    counts: bool  # it counts toward the budget: its epochs are recorded (budget.py)
    retried: bool  # a WAITING copy with its parameters is queued (workers.retry)
    goes_on: bool  # the study goes on; False: the exception that ended it is raised again
    reason: str | None  # the reason it records; None: the exception's words (or the caller's)


# name                      Optuna state         MLflow        tag             counts retried goes_on reason
COMPLETE = Outcome("complete", TrialState.COMPLETE, RUN_FINISHED, STATE_COMPLETE, True, False, True, "")
PRUNED = Outcome("pruned", TrialState.PRUNED, RUN_KILLED, STATE_PRUNED, True, False, True, None)
DIVERGED = Outcome("diverged", TrialState.FAIL, RUN_FAILED, STATE_FAIL, True, False, True, None)
OUT_OF_MEMORY = Outcome("out of memory", TrialState.FAIL, RUN_FAILED, STATE_FAIL, True, False, True, None)
INTERRUPTED = Outcome("interrupted", TrialState.FAIL, RUN_KILLED, STATE_FAIL, False, False, False, "interrupted")
BUG = Outcome("bug", TrialState.FAIL, RUN_FAILED, STATE_FAIL, False, False, False, None)
WORKER_LOST = Outcome("worker lost", TrialState.FAIL, RUN_KILLED, STATE_FAIL, False, True, True, None)
STALE_WHILE_RUNNING = Outcome("failed as stale while running", TrialState.FAIL, RUN_KILLED, STATE_FAIL, False, True, True,
                              "failed as stale by another worker")
ORPHANED = Outcome("orphaned run", None, RUN_KILLED, STATE_ORPHANED, False, False, True, None)

OUTCOMES = (COMPLETE, PRUNED, DIVERGED, OUT_OF_MEMORY, INTERRUPTED, BUG, WORKER_LOST, STALE_WHILE_RUNNING, ORPHANED)
# An out-of-memory error counts whether it stopped one trial or a whole --parallel group: every member
# trained up to it, as a lone trial would have; the same row is written for each.
# WORKER_LOST and STALE_WHILE_RUNNING are retried by the worker that finds the trial stale
# (workers.recover_stale), at most workers.MAX_RETRIES times along one chain, if it had sampled parameters.


def classify(error: BaseException | None) -> Outcome:
    """The row for a trial that stopped with `error` (None: it trained to the end)."""
    import torch

    from kdsweep.training.loop import NonFiniteLoss

    if error is None:
        return COMPLETE
    kinds = ((optuna.TrialPruned, PRUNED), (NonFiniteLoss, DIVERGED), (torch.cuda.OutOfMemoryError, OUT_OF_MEMORY),
             (KeyboardInterrupt, INTERRUPTED),  # SIGTERM too (cli.Terminated)
             (optuna.exceptions.UpdateFinishedTrialError, STALE_WHILE_RUNNING))  # another worker ended it
    return next((outcome for kind, outcome in kinds if isinstance(error, kind)), BUG)


def reason_of(outcome: Outcome, error: BaseException | None = None, said: str = "") -> str:
    """The reason a trial records: the row's words, else what the caller said, else the exception's first line."""
    if outcome.reason is not None:
        return outcome.reason
    if said or error is None:
        return said
    if isinstance(error, optuna.TrialPruned):
        return str(error)  # "pruned after epoch 2 of 5"
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:250] if lines else ''}".rstrip(": ")


@dataclass
class Ending:
    """The facts of one trial's end, beyond its row."""

    error: BaseException | None = None  # what stopped it (None: it trained to the end, or it is not ours)
    reason: str = ""  # the caller's words for why (a stale trial's); else the row's or the error's
    epochs: int | None = None  # epochs it trained: recorded when its row counts
    seconds: float | None = None  # its training wall time (MLflow train_seconds, with the epochs)
    value: float | None = None  # the objective (complete trials)
    attrs: dict[str, Any] = field(default_factory=dict)  # more Optuna user attributes (test_acc, failed_at_epoch)
    tags: dict[str, Any] = field(default_factory=dict)  # more MLflow tags (pruned_at_epoch, failed_at_epoch)
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # epochs' metrics not yet in MLflow
    reports: dict[int, float] = field(default_factory=dict)  # epochs' val_acc not yet in Optuna (pruning.Reports)


@dataclass
class Records:
    """Where one trial is recorded: its Optuna trial (None for a confirmation seed) and its MLflow run (None: none yet)."""

    tracker: Any = None
    run: str | None = None
    trial: optuna.Trial | FrozenTrial | None = None
    storage: Any = None  # for a FrozenTrial (a stale trial); an optuna.Trial brings its own
    say: Callable[[str], None] = lambda msg: None
    line: Callable[[FrozenTrial], None] | None = None  # the progress line of a finished trial

    def __post_init__(self):
        if self.storage is None and isinstance(self.trial, optuna.Trial):
            self.storage = self.trial.storage


def end_trial(rec: Records, outcome: Outcome, end: Ending | None = None) -> Outcome:
    """Record how a trial ended, in the order of the module docstring; return the outcome recorded.

    For an outcome after which the study stops (goes_on False) every write is best effort: the
    exception that stopped it is what the user must see. Otherwise an Optuna write that fails
    raises (after the trial was ended as what that failure means). MLflow writes are best effort
    while an exception that stopped the trial is being handled (a resume closes the run), and
    raise otherwise (a complete trial, a run closed from Optuna's record, an orphan).
    """
    end = end or Ending()
    strict = outcome.goes_on
    reason = reason_of(outcome, end.error, end.reason)
    stored: FrozenTrial | None = None
    if rec.trial is not None:
        try:
            outcome, stored = _write_optuna(rec, outcome, end, reason)
        except BaseException as err:
            if not strict:
                pass  # the run is still closed below; the trial is failed as stale when the study resumes
            elif isinstance(err, optuna.exceptions.UpdateFinishedTrialError):
                outcome, stored = STALE_WHILE_RUNNING, None
            elif _landed(rec, outcome):
                # Stopped after the state was stored (a Ctrl-C in tell's log line or the sampler's after_trial):
                # Optuna holds this outcome, so the run ends as this outcome too, then the stop goes on.
                if rec.run is not None:
                    _close_run(rec, outcome, end, reason, strict=False, error=err)
                raise
            else:
                end_trial(rec, classify(err), Ending(error=err))
                raise
        if outcome is STALE_WHILE_RUNNING:
            reason = _stale_while_running(rec, stored, strict)
    if rec.run is not None:
        try:
            _close_run(rec, outcome, end, reason, strict=end.error is None, error=end.error)
        except BaseException as err:
            if rec.trial is None and outcome is COMPLETE:  # a confirmation seed: nothing else records it
                _close_run(rec, classify(err), Ending(error=err), reason_of(classify(err), err), strict=False, error=err)
            raise  # a trial's run stays open: it is closed from Optuna's record when the study ends or resumes
    if rec.trial is not None and outcome.goes_on:
        _tell_people(rec, outcome, reason)
    return outcome


def _set_attr(rec: Records, key: str, value: Any) -> None:
    if isinstance(rec.trial, optuna.Trial):
        rec.trial.set_user_attr(key, value)
    else:
        rec.storage.set_trial_user_attr(rec.trial._trial_id, key, value)


def _write_optuna(rec: Records, outcome: Outcome, end: Ending, reason: str) -> tuple[Outcome, FrozenTrial | None]:
    """Steps 1 and 2: the trial's curve and attributes, then its state. The only writer of a trial's Optuna state."""
    write_reports(rec.storage, rec.trial._trial_id, end.reports)
    if outcome.optuna == TrialState.FAIL:
        _set_attr(rec, REASON_ATTR, reason)
    for key, value in end.attrs.items():
        _set_attr(rec, key, value)
    _set_attr(rec, EPOCHS_ATTR, end.epochs if outcome.counts else None)  # the budget attribute, last
    trial_id = rec.trial._trial_id
    if isinstance(rec.trial, optuna.Trial):
        value = end.value if outcome.optuna == TrialState.COMPLETE else None
        rec.trial.study.tell(rec.trial, value, state=outcome.optuna, skip_if_finished=True)
    elif not rec.storage.set_trial_state_values(trial_id, state=outcome.optuna):
        return STALE_WHILE_RUNNING, None
    stored = rec.storage.get_trial(trial_id)
    return (outcome if stored.state == outcome.optuna else STALE_WHILE_RUNNING), stored


def _landed(rec: Records, outcome: Outcome) -> bool:
    """Whether Optuna holds the trial in `outcome`'s state although writing it raised (False if it cannot be read)."""
    try:
        return rec.storage.get_trial(rec.trial._trial_id).state == outcome.optuna
    except Exception:  # noqa: BLE001 - unreadable: ended as the failure, as if the state had not landed
        return False


def _stale_while_running(rec: Records, stored: FrozenTrial | None, strict: bool) -> str:
    """Another worker failed this trial as stale while it ran here: say so; return the run's reason."""
    if strict and rec.run is not None:
        if stored is None:
            try:
                stored = rec.storage.get_trial(rec.trial._trial_id)
            except Exception:  # noqa: BLE001 - only for the message
                pass
        state = stored.state.name if stored is not None else STATE_FAIL
        why = stored.user_attrs.get(REASON_ATTR, "stale") if stored is not None else "stale"
        rec.say(f"trial {rec.trial.number} had been marked {state} by another worker ({why}); its result is not counted")
    return STALE_WHILE_RUNNING.reason


def _run_tags(outcome: Outcome, end: Ending, reason: str) -> dict[str, Any]:
    tags = {STATE_TAG: outcome.tag, **(end.tags if outcome.counts else {})}
    if reason:
        tags[REASON_TAG] = reason
    return tags


def _run_metrics(outcome: Outcome, end: Ending) -> dict[str, float]:
    if not outcome.counts or end.epochs is None:
        return {}
    return {"epochs_trained": end.epochs, **({"train_seconds": end.seconds} if end.seconds is not None else {})}


def _close_run(rec: Records, outcome: Outcome, end: Ending, reason: str, strict: bool, error: BaseException | None) -> None:
    """Step 3: tag the trial's MLflow run with its outcome and end it. The only place a trial's run is ended.

    Best effort unless `strict`: it may run while an exception propagates and must not replace it (a
    Ctrl-C that landed inside an MLflow write leaves the store locked for a moment), so it tries twice.
    A run left open here is closed from Optuna's record when the study ends or resumes.
    """
    history = end.history
    for attempt in range(1 if strict else 2):
        try:
            if history:
                rec.tracker.log_steps(rec.run, history)
                history = []  # written: a retry must not write it twice
            rec.tracker.log(rec.run, _run_metrics(outcome, end), tags=_run_tags(outcome, end, reason))
            rec.tracker.end(rec.run, outcome.status)
            return
        except Exception as err:  # noqa: BLE001
            if strict:
                raise
            if error is not None and failures.explain(error) and failures.explain(err):
                return  # the store is full, corrupt or read-only: the CLI says so; a resume closes the run
            if attempt == 0:
                time.sleep(2.0)
                continue
            which = f" of trial {rec.trial.number}" if rec.trial is not None else ""
            rec.say(f"warning: could not close MLflow run {rec.run}{which} now ({type(err).__name__}); "
                    f"it is closed when the study ends or resumes")


def _tell_people(rec: Records, outcome: Outcome, reason: str) -> None:
    """Step 4: every ended trial gets its progress line (in a log); a trial that failed by its own fault is said in
    one line: its progress line, which carries the reason, or where there is none (bars, --quiet) a line of its own."""
    if rec.line is not None and rec.storage is not None:
        try:
            rec.line(rec.storage.get_trial(rec.trial._trial_id))
            return
        except Exception:  # noqa: BLE001 - a log line is never worth stopping the study for
            pass
    if outcome in (DIVERGED, OUT_OF_MEMORY) and rec.run is not None:
        rec.say(f"trial {rec.trial.number} failed: {reason}; the study goes on")


def closed_as_interrupted(run: Any) -> bool:
    """Whether an MLflow run was ended by the INTERRUPTED row.

    The run of a trial Optuna holds COMPLETE can be so only if written before 2026-12-05: a Ctrl-C landed
    after tell stored the state and the run was closed as the interrupt. A resume closes it from Optuna's record.
    """
    return run.info.status == INTERRUPTED.status and run.data.tags.get(REASON_TAG) == INTERRUPTED.reason


def recorded_outcome(trial: FrozenTrial) -> Outcome:
    """The row an ended trial was recorded with, read back from Optuna (for closing its run afterwards)."""
    if trial.state == TrialState.COMPLETE:
        return COMPLETE
    if trial.state == TrialState.PRUNED:
        return PRUNED
    return WORKER_LOST if trial.user_attrs.get(EPOCHS_ATTR) is None else DIVERGED
