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
A stale trial is marked FAIL and, if it had sampled parameters, retried: a
WAITING copy with the same parameters is added (at most MAX_RETRIES times
along one chain). Closing its MLflow run is the caller's job (`on_stale`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import threading
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from .budget import EPOCHS_ATTR
from .errors import UserError

OWNER_ATTR = "kdsweep.owner"
REASON_ATTR = "fail_reason"
RETRY_OF_ATTR = "kdsweep.retry_of"
MAX_RETRIES = 2


def _env_seconds(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"${name} must be a whole number of seconds, got {raw!r}") from None
    if value < 1:
        raise UserError(f"${name} must be at least 1 second, got {value}")
    return value


def heartbeat_settings() -> tuple[int, int]:
    """(interval, grace period) in seconds, from $KDSWEEP_HEARTBEAT and $KDSWEEP_GRACE."""
    interval = _env_seconds("KDSWEEP_HEARTBEAT", 10)
    grace = _env_seconds("KDSWEEP_GRACE", max(60, 3 * interval))
    if grace <= interval:
        raise UserError(f"$KDSWEEP_GRACE ({grace}s) must be longer than $KDSWEEP_HEARTBEAT ({interval}s)")
    return interval, grace


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


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _node_id() -> str:
    """Where a pid means something: the same kernel boot and the same pid namespace."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pidns = ""
    raw = f"{socket.gethostname()}|{boot}|{pidns}"
    return hashlib.blake2b(raw.encode(), digest_size=8).hexdigest()


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot; '' if it is gone, a zombie, or /proc is missing."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return ""
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) <= 19 or fields[0] in ("Z", "X"):  # fields[0] is the state: a zombie is dead, only not yet reaped
        return ""
    return fields[19]


@dataclass(frozen=True)
class Owner:
    node: str
    host: str
    pid: int
    started: str

    @classmethod
    def me(cls) -> "Owner":
        return cls(_node_id(), socket.gethostname(), os.getpid(), _start_time(os.getpid()))

    @classmethod
    def from_attr(cls, value) -> "Owner | None":
        if not isinstance(value, dict):
            return None
        try:
            return cls(str(value["node"]), str(value["host"]), int(value["pid"]), str(value.get("started", "")))
        except (KeyError, TypeError, ValueError):
            return None

    def as_attr(self) -> dict:
        return asdict(self)

    def alive(self) -> bool | None:
        """Whether the owner process still runs; None when it ran on another node (ask the heartbeat)."""
        if self.node != _node_id():
            return None
        if self.started and Path("/proc").is_dir():
            return _start_time(self.pid) == self.started  # '' when gone; another value when the pid was reused
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}"


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

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------- the study lock


def _open_lock_file(path: Path, db: Path) -> int:
    """A descriptor to flock `path` through; -1 (no lock) where it cannot be had and store `db` is read-only.

    flock works on a read-only descriptor too, so a lock file someone else created still locks. Without
    one, a store this process cannot write can still be read (`kdsweep report --no-log`), and there is
    nothing to serialise. A store it can write is never used unlocked: the permission error stands.
    """
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        if not isinstance(e, PermissionError) and e.errno != errno.EROFS:
            raise
        refused = e
    try:
        return os.open(path, os.O_RDONLY)
    except (FileNotFoundError, PermissionError):
        if db.exists() and os.access(db, os.W_OK) and os.access(db.parent, os.W_OK):
            raise refused from None
        return -1


def _lock_key(name: str) -> int:
    """A signed 64-bit key for PostgreSQL's advisory locks."""
    return int.from_bytes(hashlib.blake2b(f"kdsweep:{name}".encode(), digest_size=8).digest(), "big", signed=True)


class StudyLock:
    """Mutual exclusion between the workers of one study, for the few milliseconds of a claim.

    * SQLite file: an flock on `<db>.kdsweep-lock` beside it (workers share one host).
    * PostgreSQL: a transaction-scoped advisory lock on its own connection; if
      a worker dies holding it, the server drops the connection and the lock,
      and a worker that hangs loses it after idle_in_transaction_session_timeout.
    * anything else: no lock (`exact` is False); claims can then race.
    """

    IDLE_TIMEOUT_MS = 120_000

    def __init__(self, url: str, name: str):
        self.name = name
        self.exact = True
        self._fd: int | None = None
        self._path: Path | None = None
        self._engine = None
        self._conn = None
        self._mutex = threading.Lock()
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            self._db = Path(url[len("sqlite:///"):].split("?", 1)[0])
            self._path = self._db.with_name(self._db.name + ".kdsweep-lock")
        elif url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres"):
            import sqlalchemy
            from sqlalchemy.pool import NullPool

            self._engine = sqlalchemy.create_engine(url, poolclass=NullPool)
        elif not url.startswith("sqlite"):
            self.exact = False

    def __enter__(self) -> "StudyLock":
        self._mutex.acquire()
        try:
            if self._path is not None:
                import fcntl

                if self._fd is None:
                    self._fd = _open_lock_file(self._path, self._db)
                if self._fd >= 0:
                    fcntl.flock(self._fd, fcntl.LOCK_EX)
            elif self._engine is not None:
                from sqlalchemy import text

                self._conn = self._engine.connect()
                self._conn.execute(text(f"SET idle_in_transaction_session_timeout = {self.IDLE_TIMEOUT_MS}"))
                self._conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(self.name)})
        except BaseException:
            self._drop_connection()
            self._mutex.release()
            raise
        return self

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()  # rolls back: the advisory lock goes with the transaction
            self._conn = None

    def __exit__(self, *exc) -> None:
        try:
            if self._fd is not None and self._fd >= 0:
                import fcntl

                fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._drop_connection()
        finally:
            self._mutex.release()

    def close(self) -> None:
        if self._fd is not None:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = None
        if self._engine is not None:
            self._engine.dispose()


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
    """Mark a RUNNING trial FAIL; False if another worker (or its owner) finished it first."""
    try:
        storage.set_trial_user_attr(trial._trial_id, REASON_ATTR, reason)
        # Lost to infrastructure: whatever it trained does not count (budget.py); its retry trains it again.
        storage.set_trial_user_attr(trial._trial_id, EPOCHS_ATTR, None)
        return bool(storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL))
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


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

    heartbeat_failed: list[FrozenTrial] = []
    previous = storage.heartbeat_stale_trial_callback
    storage.heartbeat_stale_trial_callback = lambda _study, t: heartbeat_failed.append(t)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    finally:
        storage.heartbeat_stale_trial_callback = previous
    failed += [(t, f"no heartbeat from its worker for over {grace}s") for t in heartbeat_failed]

    for t, reason in failed:
        on_stale(t, reason)
    return [t for t, _ in failed]
