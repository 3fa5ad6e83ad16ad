"""Process identity: which node, pid and start time a worker or run owner is, so a dead owner can be
told from a live one (pids are reused), and which command it is a worker of (`--processes N`).
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from kdsweep.common.errors import UserError

COMMAND_ENV = "KDSWEEP_WORKER_COMMAND"  # set for each worker of a --processes command: an id they share, and no one else
PROCESSES_ENV = "KDSWEEP_WORKER_PROCESSES"  # set for each worker: how many workers its command started
INDEX_ENV = "KDSWEEP_WORKER_INDEX"  # set for each worker: which of them it is, from 0


def processes_here() -> int:
    """How many worker processes of one command this process is one of (1 when started alone); recorded with
    every run, as the threads are, so costs are compared like with like."""
    value = os.environ.get(PROCESSES_ENV, "")
    return int(value) if value.isdigit() and int(value) >= 1 else 1


def index_here() -> int:
    """Which of its command's worker processes this one is, from 0 (0 when started alone)."""
    value = os.environ.get(INDEX_ENV, "")
    return int(value) if value.isdigit() and int(value) < processes_here() else 0


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_share(processes: int | None = None) -> int:
    """The cores one of `processes` workers (default: this process's command's) may keep busy: its worker threads
    on a CPU when the user gave no --cpu-workers, and at most its intra-op threads (training/devices.py)."""
    return max(1, cores() // (processes or processes_here()))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name, from the state on; [] if the process is gone or /proc is
    missing. The command name (field 2) may hold spaces and parentheses: split after the last ')'."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[-1].split() if stat else []


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot; '' if it is gone, a zombie, or /proc is missing."""
    fields = _stat(pid)
    if len(fields) <= 19 or fields[0] in ("Z", "X"):  # fields[0] is the state: a zombie is dead, only not yet reaped
        return ""
    return fields[19]


@dataclass(frozen=True)
class Owner:
    node: str
    host: str
    pid: int
    started: str
    command: str = ""  # the id of the --processes command it is a worker of; "" when started alone

    @classmethod
    def me(cls) -> "Owner":
        return cls(_node_id(), socket.gethostname(), os.getpid(), _start_time(os.getpid()),
                   os.environ.get(COMMAND_ENV, ""))

    @classmethod
    def from_attr(cls, value) -> "Owner | None":
        if not isinstance(value, dict):
            return None
        try:
            return cls(str(value["node"]), str(value["host"]), int(value["pid"]), str(value.get("started", "")),
                       str(value.get("command", "")))
        except (KeyError, TypeError, ValueError):
            return None

    def as_attr(self) -> dict:
        attr = asdict(self)
        if not self.command:
            del attr["command"]  # a command started alone records what it always did
        return attr

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

    def is_fellow(self) -> bool:
        """Whether the owner is another worker of this process's --processes command, live or exited since:
        its trials and runs are the command's own."""
        mine = os.environ.get(COMMAND_ENV, "")
        return bool(mine) and self.command == mine and self.pid != os.getpid()  # one command's workers share a node

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}"


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
