"""Shared by the reliability tests: run the CLI as a real process and read back what Optuna and MLflow hold."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a `kdsweep` child: this checkout's code, a private cache, quiet MLflow."""
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "KDSWEEP_CACHE": str(tmp / "cache"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def _default_sigint() -> None:
    # A shell may start background jobs (and so this test run) with SIGINT ignored, and Python keeps an
    # ignored SIGINT ignored: give the child the default, so that Python turns it into KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(args: list[str], cwd: Path, env: dict[str, str], log: Path | None = None) -> subprocess.Popen:
    """`kdsweep ARGS` as a child process, stdout and stderr together (in `log`, or a pipe)."""
    out = open(log, "wb") if log else subprocess.PIPE
    try:
        return subprocess.Popen([sys.executable, "-m", "kdsweep.cli", *args], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_default_sigint)
    finally:
        if log:
            out.close()


def run_cli(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdsweep.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, every: float = 0.05):
    """Poll `predicate` until it returns something truthy; fail if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else b""
            raise AssertionError(f"process exited with {proc.returncode} while waiting:\n{out[-3000:]!r}")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s")


def running_trial_of(storage_db: Path, pid: int) -> int | None:
    """The number of a RUNNING trial owned by process `pid` in a kdsweep SQLite Optuna file, read-only."""
    import sqlite3

    if not storage_db.is_file():
        return None
    try:
        con = sqlite3.connect(f"file:{storage_db}?mode=ro", uri=True, timeout=1)
        try:
            rows = con.execute("SELECT t.number, a.value_json FROM trials t JOIN trial_user_attributes a "
                               "ON a.trial_id = t.trial_id WHERE t.state = 'RUNNING' AND a.key = 'kdsweep.owner'").fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return None
    for number, value in rows:
        if json.loads(value).get("pid") == pid:
            return number
    return None


def load_trials(storage: str, study_name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=True)


def mlflow_runs(tracking_uri: str, study_name: str) -> tuple[list, list]:
    """(trial runs, parent runs) of one study, every experiment searched."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    runs = []
    for exp in client.search_experiments():
        runs += client.search_runs([exp.experiment_id], max_results=10000)
    mine = [r for r in runs if r.data.tags.get("kdsweep.study") == study_name]
    return ([r for r in mine if r.data.tags.get("kdsweep.role") == "trial"],
            [r for r in mine if r.data.tags.get("kdsweep.role") == "study"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
