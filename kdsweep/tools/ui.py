"""`kdsweep ui`: MLflow's server on kdsweep's store, owned from start to stop (issue 13).

`mlflow ui` run plainly leaves processes behind: stopped with `kill`, its
uvicorn server can stay on the port, and its job runner (seven huey consumer
processes, for MLflow's GenAI jobs) survives even a SIGTERM to the whole
process group. So here:
  * the port is checked first: taken, it is one line and exit status 2;
  * the job runner is turned off (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false:
    the runs, charts and artifacts of the UI need no jobs);
  * the server starts in a session of its own, so the terminal's Ctrl-C and
    hang-up reach only us; on SIGINT, SIGTERM or SIGHUP we terminate its
    whole process group, wait, and kill whatever of it is left: every process
    of its session and every descendant seen while it ran;
  * uvicorn runs without its access log (a line per HTTP request: hundreds for
    a few page loads) and at log level warning: errors and tracebacks still show;
  * every kdsweep experiment gains the UI tags it lacks (tracking.notes.ui_tags:
    the model-training kind and kdsweep's saved views of the runs page), and
    once the port answers the URL of the newest one is printed: its runs table
    in the model-training view (MLflow 3 opens an experiment on its GenAI
    traces page), on the saved view that ranks the studies by best_val_acc.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from kdsweep.common.errors import UserError
from kdsweep.common.uris import redact
from kdsweep.tracking.notes import runs_url

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
GRACE_SECONDS = 5.0  # for the server to stop on SIGTERM before what is left is killed
START_SECONDS = 120.0  # for the port to answer (a busy machine imports MLflow slowly)
SERVER_ENV = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no huey job runner: nothing the runs UI needs
    "MLFLOW_DISABLE_TELEMETRY": "true",
}
# Unless the user set Python's warnings: Starlette's deprecation of a middleware MLflow uses is nothing they can act on.
SERVER_ENV_DEFAULTS = {"PYTHONWARNINGS": "ignore:starlette.middleware.wsgi is deprecated"}
# uvicorn's options: no access log (a line per request), only warnings and errors of its own.
UVICORN_OPTS = "--no-access-log --log-level warning"
MODEL_TRAINING_HINT = ("the link opens the runs table in MLflow's \"Model training\" view, studies ranked by best_val_acc "
                       "(the objective; \"Views\" at the top right has the trials' view); opened otherwise, MLflow "
                       "starts in its GenAI view: switch the toggle at the top left to \"Model training\".")


class Stop(BaseException):
    """A stop signal arrived while the server ran."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# ---------------------------------------------------------------- the process table


def proc_stat(pid: int) -> tuple[str, int, int, int, str] | None:
    """(state, ppid, process group, session, start time) of a live process, from /proc; None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) ": comm may hold spaces
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3]), fields[19]


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def related(root: int, session: int) -> dict[int, str]:
    """pid -> start time of every live process in `session` or descended from `root` (zombies left out)."""
    stats = {pid: st for pid in _all_pids() if (st := proc_stat(pid)) is not None and st[0] != "Z"}
    found = {pid for pid, st in stats.items() if st[3] == session}
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        children.setdefault(st[1], []).append(pid)
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            found.add(pid)
        todo += [c for c in children.get(pid, []) if c not in found]
    return {pid: stats[pid][4] for pid in found if pid in stats}


def _alive(pid: int, started: str) -> bool:
    st = proc_stat(pid)
    return st is not None and st[0] != "Z" and st[4] == started  # same start time: not a reused pid


def _signal_all(procs: dict[int, str], sig: int) -> None:
    for pid, started in procs.items():
        if _alive(pid, started):
            try:
                os.kill(pid, sig)
            except OSError:
                pass


# ---------------------------------------------------------------- port and experiment


def check_port(host: str, port: int) -> None:
    """Refuse a port that something already listens on (or that cannot be bound here) before starting anything."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e.strerror}") from None
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a closed port in TIME_WAIT is free
            try:
                s.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise UserError(f"port {port} on {host} is already in use (another `kdsweep ui` or MLflow server?); "
                                    f"choose another with --port") from None
                raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def browse_host(host: str) -> str:
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def newest_experiment(uri: str) -> tuple[str, str, str | None] | None:
    """(id, name, saved view to open) of the kdsweep experiment whose latest run started last (the one just
    worked on). On the way every kdsweep experiment gains the UI tags it lacks (older ones were created
    without); a store that cannot take them is left as it is, and the link then names no saved view."""
    from mlflow.tracking import MlflowClient

    from kdsweep.tracking.notes import STUDIES_VIEW, VIEW_TAG, ui_tags
    from kdsweep.tracking.tracker import add_missing_tags, quiet

    quiet()
    client = MlflowClient(tracking_uri=uri)
    best, newest = None, -1
    now = int(time.time() * 1000)
    for exp in client.search_experiments(filter_string="name LIKE 'kdsweep/%'"):
        has_view = VIEW_TAG + STUDIES_VIEW in exp.tags
        try:
            add_missing_tags(client, exp, ui_tags(exp.name, now))
            has_view = True
        except Exception:  # noqa: BLE001 - a read-only store: the UI still opens, without the saved view
            pass
        runs = client.search_runs([exp.experiment_id], max_results=1, order_by=["attributes.start_time DESC"])
        started = runs[0].info.start_time if runs else exp.creation_time or 0
        if started > newest:
            best, newest = (exp.experiment_id, exp.name, STUDIES_VIEW if has_view else None), started
    return best


# ---------------------------------------------------------------- serving


def server_command(host: str, port: int) -> list[str]:
    """The server's command line. It names no store: a command line is visible to every user of the machine
    (`ps`), and a store URI may carry a password; server_env passes the store instead."""
    # One worker: a UI for one person, and ~7x faster than four on a SQLite store (shared/notes).
    return [sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port), "--workers", "1",
            "--uvicorn-opts", UVICORN_OPTS]


def server_env(uri: str) -> dict[str, str]:
    """The server's environment: ours, kdsweep's quiet settings, and the store in MLflow's own variable for
    `--backend-store-uri` (a process's environment is readable by its user and root only)."""
    return {**SERVER_ENV_DEFAULTS, **os.environ, **SERVER_ENV, "MLFLOW_BACKEND_STORE_URI": uri}


def _raise_stop(signum, frame):
    raise Stop(signum)


def _stop(proc: subprocess.Popen, seen: dict[int, str]) -> int:
    """Terminate the server's process group, then kill whatever of its session and descendants is left."""
    seen = {**seen, **related(proc.pid, proc.pid)}
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the group id is its pid
    except OSError:
        pass
    _signal_all(seen, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while time.monotonic() < deadline:
        proc.poll()
        seen.update(related(proc.pid, proc.pid))  # a child forked meanwhile
        if not any(_alive(pid, t) for pid, t in seen.items()):
            break
        time.sleep(0.1)
    left = {pid: t for pid, t in {**seen, **related(proc.pid, proc.pid)}.items() if _alive(pid, t)}
    _signal_all(left, signal.SIGKILL)
    try:
        proc.wait(GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    return len(seen)


def _say(say: Callable[[str], None], msg: str) -> None:
    try:
        say(msg)
    except OSError:  # the terminal is gone (SIGHUP): nothing to tell
        pass


def serve(uri: str, host: str, port: int, say: Callable[[str], None] = print) -> int:
    """Run `mlflow ui` on `uri` until it exits or a stop signal comes; return the exit status."""
    check_port(host, port)
    cmd, env = server_command(host, port), server_env(uri)
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    # Signals wait (blocked) until the server's Popen is held, so a stop can never leave it unowned; the
    # server unblocks them for itself before it starts.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    proc, seen, status = None, {}, 0
    try:
        for s in STOP_SIGNALS:
            if previous[s] is not signal.SIG_IGN:  # started under nohup: a hang-up stays ignored
                signal.signal(s, _raise_stop)
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a signal that came meanwhile is raised here
        url = f"http://{browse_host(host)}:{port}"
        _say(say, f"starting the MLflow UI on {url} for {redact(uri)} (Ctrl-C to stop)")
        try:
            exp = newest_experiment(uri)
        except Exception:  # noqa: BLE001 - only the link is lost
            exp = None
        while not answers(browse_host(host), port):
            if proc.poll() is not None:
                _say(say, f"the MLflow server exited with status {proc.returncode} before it answered on {url}")
                return proc.returncode or 1
            seen.update(related(proc.pid, proc.pid))
            time.sleep(0.2)
        seen.update(related(proc.pid, proc.pid))
        if exp is not None:
            _say(say, f"runs of {exp[1]}: {runs_url(url, exp[0], exp[2])}")
            _say(say, MODEL_TRAINING_HINT)
        else:
            _say(say, f"open {url} (no kdsweep experiment in the store yet)")
        while proc.poll() is None:
            seen.update(related(proc.pid, proc.pid))
            time.sleep(0.5)
        status = proc.returncode
    except Stop as e:
        status = EXIT_STATUS[e.signum]
    finally:
        for s in STOP_SIGNALS:  # a second Ctrl-C must not cut the clean-up short
            if previous[s] is not signal.SIG_IGN:
                signal.signal(s, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        try:
            if proc is not None:
                n = _stop(proc, seen)
                if status:
                    _say(say, f"stopped the MLflow UI ({n} processes ended)")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return status
