"""Several workers, one study: trial ownership, heartbeats, stale trials and the study lock.

A worker is one `kdsweep study` process. Before it trains a trial it *claims*
it: under the study lock it recovers stale trials, counts the trials that are
complete or running, and only if the study still needs one does it create a
trial and write its owner (node, host, pid, process start time) into the
trial's user attributes. So the study ends with exactly --trials complete
trials however many workers share it.

A RUNNING trial is stale when
  * its owner ran on this node (same kernel boot and pid namespace) and that
    process is gone: detected at once, which is what a resume after
    `kill -9` needs;
  * it has no owner while we hold the lock: its worker died between creating
    and claiming it (claims happen under the lock);
  * its Optuna heartbeat is older than the grace period (RDB storage): the
    only signal for a worker on another machine.
A stale trial is marked FAIL (outcome.WORKER_LOST) and, if it had sampled parameters, retried: a
WAITING copy with the same parameters is added (at most MAX_RETRIES times
along one chain). Closing its MLflow run is the caller's job (`on_stale`).
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsweep.common.processes import Owner
from kdsweep.tracking.vocabulary import OWNER_ATTR, RETRY_OF_ATTR

MAX_RETRIES = 2


# --------------------------------------------------------------------------- stop requests


_stop: type[BaseException] | None = None


def request_stop(exc_type: type[BaseException] | None) -> None:
    """Remember that a signal asked this worker to stop (None: forget it)."""
    global _stop
    _stop = exc_type


def check_stop() -> None:
    """Raise the interrupt a signal asked for, in case the first one was lost.

    Python drops an exception raised inside a garbage-collector callback or a
    __del__ ("Exception ignored in ..."), so a Ctrl-C that lands there would be
    swallowed and the study would run on. The study checks here once per epoch
    and before each trial.
    """
    if _stop is not None:
        raise _stop()


# --------------------------------------------------------------------------- owners


def claim(trial: optuna.Trial, owner: Owner) -> None:
    trial.set_user_attr(OWNER_ATTR, owner.as_attr())


# --------------------------------------------------------------------------- heartbeats


class Heartbeat:
    """Record an Optuna heartbeat for one trial every `interval` seconds, in a thread.

    The same thing `study.optimize` does for its trials; kdsweep drives trials
    with ask/tell, so it beats itself. A failed beat (a storage hiccup) is not
    fatal: the next one may succeed, and only a grace period without any marks
    the trial stale.
    """

    def __init__(self, storage, trial_id: int, interval: int):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kdsweep-heartbeat-{trial_id}", daemon=True)

    def _beat(self) -> None:
        try:
            self.storage.record_heartbeat(self.trial_id)
        except Exception:  # noqa: BLE001 - see the class docstring
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def __enter__(self) -> "Heartbeat":
        self._beat()  # at once: a trial is never without a heartbeat while it trains
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- the study lock


# --------------------------------------------------------------------------- stale trials


def _unowned_too_long(trial: FrozenTrial, grace: int) -> bool:
    start = trial.datetime_start
    return start is not None and datetime.now() - start > timedelta(seconds=grace)


def stale_reason(trial: FrozenTrial, locked: bool, grace: int) -> str | None:
    """Why a RUNNING trial is stale (judged from here, without heartbeats), or None."""
    owner = Owner.from_attr(trial.user_attrs.get(OWNER_ATTR))
    if owner is None:
        if locked or _unowned_too_long(trial, grace):
            return "its worker died before claiming it"
        return None
    if owner.alive() is False:
        return f"its worker {owner} is gone (killed or crashed)"
    return None


def fail_trial(storage, trial: FrozenTrial, reason: str) -> bool:
    """Mark a RUNNING trial FAIL (outcome.WORKER_LOST); False if another worker (or its owner) finished it first.

    Lost to infrastructure: whatever it trained does not count (budget.py); its retry trains it again.
    """
    from kdsweep.study import outcome  # torch-free until a study runs

    return outcome.end_trial(outcome.Records(trial=trial, storage=storage), outcome.WORKER_LOST,
                             outcome.Ending(reason=reason)) is outcome.WORKER_LOST


def retry(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Queue a WAITING copy of a stale trial (same parameters); False when it is not worth one."""
    if not trial.params:
        return False  # it died before sampling: any new trial is the same
    history = list(trial.system_attrs.get("retry_history", [])) + [trial.number]
    if len(history) > MAX_RETRIES:
        return False
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={RETRY_OF_ATTR: trial.number, "kdsweep.retry_reason": reason},
        # The same system attributes as optuna.storages.RetryHeartbeatStaleTrialCallback writes.
        system_attrs={"failed_trial": history[0], "retry_history": history},
    ))
    return True


OnStale = Callable[[FrozenTrial, str], None]


def recover_stale(study: optuna.Study, storage, grace: int, locked: bool, on_stale: OnStale) -> list[FrozenTrial]:
    """Fail every stale RUNNING trial of the study; call on_stale(trial, reason) for those we failed."""
    failed: list[tuple[FrozenTrial, str]] = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = stale_reason(t, locked, grace)
        if reason and fail_trial(storage, t, reason):
            failed.append((t, reason))

    # Silent for longer than the grace period (RDB storage): what optuna.storages.fail_stale_trials finds, failed
    # here as every stale trial is (outcome.WORKER_LOST), so that what it had recorded stops counting too.
    silent = f"no heartbeat from its worker for over {grace}s"
    if getattr(storage, "get_heartbeat_interval", lambda: None)() is not None:
        for trial_id in storage._get_stale_trial_ids(study._study_id):  # what fail_stale_trials asks the storage
            t = storage.get_trial(trial_id)
            if t.state == TrialState.RUNNING and fail_trial(storage, t, silent):
                failed.append((t, silent))

    for t, reason in failed:
        on_stale(t, reason)
    return [t for t, _ in failed]
