"""`--processes N`: a `kdsweep study`, `sweep` or `confirm` command run as N worker processes on this machine.

Why processes: on a CPU a lockstep group steps on worker threads, and the Python between a step's
small operations (vmap, the methods' losses) holds the GIL, so threads wait for each other where
processes do not (benchmarks/gil_threads.py; docs/performance.md, "Worker processes"). The
workers are the many-workers path of docs/multi-worker.md, started for the user: each runs the
same command and claims trials from the same studies under the study lock, so every budget stays
exact and a killed worker's trial is retried (confirm's workers share out each seed's runs:
report/confirm.py). Each worker is the user's command with its own
--parallel K (N x K trials train at once); on a CPU each gets its share of the cores unless
--cpu-workers says otherwise.

The first worker reports as the command would alone (its bars, its summary, which waits for the
others' last trials); the others run --quiet and their output is shown only if they fail. Ctrl-C
and SIGTERM reach this process and are passed on, once, to every worker (they run in sessions of
their own, so a terminal's Ctrl-C does not reach them twice); if this process is killed outright,
Linux stops them with SIGTERM. Standard library only: the parent waits, it never imports torch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO

from kdsweep.common.processes import COMMAND_ENV, INDEX_ENV, PROCESSES_ENV, cpu_share

ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding this kdsweep: the workers import the same one
# Not `python -m kdsweep.cli`: -m puts the working directory first on sys.path, so run from another clone a worker
# would import that clone's kdsweep and train with other code than its command's.
WORKER = f"import sys; sys.path.insert(0, {ROOT!r}); from kdsweep.cli import entry; entry()"


def worker_argv(argv: list[str], processes: int, cpu_workers: int | None, index: int) -> list[str]:
    """Worker `index`'s arguments: the user's own, then flags that override them (argparse keeps the last)."""
    extra = ["--processes", "1"]
    if cpu_workers is None:  # ignored on CUDA
        extra += ["--cpu-workers", str(cpu_share(processes))]
    if index > 0:
        extra.append("--quiet")
    return [*argv, *extra]


def _stop_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux's PR_SET_PDEATHSIG), so none is orphaned."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _start(args: list[str], processes: int, index: int, command: str, log: IO | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
           PROCESSES_ENV: str(processes), INDEX_ENV: str(index), COMMAND_ENV: command}
    out = {} if log is None else {"stdout": subprocess.DEVNULL, "stderr": log}
    return subprocess.Popen([sys.executable, "-c", WORKER, *args], env=env, start_new_session=True,
                            preexec_fn=_stop_with_parent if sys.platform.startswith("linux") else None, **out)


def run(argv: list[str], processes: int, cpu_workers: int | None, quiet: bool) -> int:
    """Start the workers, pass signals on, wait; the first failing worker's exit status, else 0."""
    what = f"--cpu-workers {cpu_share(processes)} each on a CPU" if cpu_workers is None else \
        f"--cpu-workers {cpu_workers} each"
    print(f"{processes} worker processes on this machine ({what}); the first reports here, the others' output is "
        "shown if they fail", file=sys.stderr if quiet else sys.stdout, flush=True)
    logs = [None] + [tempfile.TemporaryFile("w+") for _ in range(processes - 1)]
    command = uuid.uuid4().hex
    procs = [_start(worker_argv(argv, processes, cpu_workers, i), processes, i, command, log)
             for i, log in enumerate(logs)]

    def pass_on(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    # Not a signal this process was started to ignore (SIGINT under nohup or `&`): the workers ignore it too.
    previous = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        codes = _wait(procs)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for i, (code, log) in enumerate(zip(codes, logs)):
        # A failure of the first worker (an interrupt too) it says itself; the others ran the same command, so
        # theirs are said only when the first one succeeded.
        if code and log is not None and not codes[0] and code not in (130, 143):
            log.seek(0)
            text = log.read().strip()
            how = f"killed by signal {-code}" if code < 0 else f"exit {code}"
            print(f"worker {i + 1} of {processes} failed ({how}):\n" + "\n".join(
                f"  [worker {i + 1}] {line}" for line in text.splitlines()[-20:]), file=sys.stderr)
    code = next((c for c in codes if c), 0)
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell says it


def _wait(procs: list[subprocess.Popen]) -> list[int]:
    """Wait for every worker; if the first one fails, stop the others (they run the same command)."""
    first = procs[0]
    while any(p.poll() is None for p in procs):
        if first.poll() not in (None, 0):
            for p in procs[1:]:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    return [p.wait() for p in procs]
