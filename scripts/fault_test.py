#!/usr/bin/env python
"""Kill a kdsweep study K times at random points, resume it each time, and audit what is left.

    python scripts/fault_test.py --kills 5
    -> kills=5 resumed=5 lost=0 duplicates=0 stuck_runs=0

Each round starts `kdsweep study` (the real CLI entry point, `kdsweep.cli.main`)
in a child process and SIGKILLs it: every third round at a random moment of
its start-up (imports, database set-up, parent run, recovery, a first claim:
as long as the last round took to get a trial RUNNING), the others at a random
moment after one of its trials became RUNNING (training, logging to MLflow,
telling Optuna, claiming the next trial). A round that completes the study
before its kill lands is not a kill; --trials is raised and the rounds go on.
With --workers W, W workers run the study at once; each kill hits one of them
at random and a new worker (the same command) takes its place, so live workers
recover the dead one's trial while they run. The next round re-runs the same command. After K kills a final run
must finish the study with exit status 0. The counts are then read back from
what Optuna and MLflow hold, not from this script's memory:

  lost        complete trials missing from the end state (fewer than --trials
              complete; a trial that was COMPLETE after some round and is not
              at the end; a COMPLETE trial without a FINISHED MLflow run)
  duplicates  more than --trials complete; two MLflow runs for one trial
              number; a FINISHED MLflow trial run whose Optuna trial is not
              COMPLETE; two COMPLETE trials with the same parameters; more
              than one parent run for the study
  stuck_runs  MLflow runs still RUNNING plus Optuna trials still RUNNING

`resumed` counts the runs started after a kill that went on to be killed in
turn or to finish with exit status 0. Children are forked from this process
after it has imported kdsweep (fast), or started as `python -m kdsweep.cli` with
--spawn. The exit status is 0 only if kills = resumed = K and the three other
counts are 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's kdsweep, not an installed one

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=5, help="SIGKILLs to deliver (default 5)")
    p.add_argument("--trials", type=int, help="complete trials the study must end with (default 2 x kills + 2)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--data-size", type=int, default=400, help="training images (default 400: short trials)")
    p.add_argument("--method", default="ce", help="default: ce (no teacher to train)")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    p.add_argument("--workdir", help="run here (default: a fresh temp dir); it must not hold an earlier study")
    p.add_argument("--workers", type=int, default=1, help="workers running the study at once (default 1); "
                   "each kill hits one of them and a new worker replaces it")
    p.add_argument("--spawn", action="store_true", help="start `python -m kdsweep.cli` instead of forking")
    p.add_argument("--round-timeout", type=float, default=300, help="seconds one round may take")
    p.add_argument("-v", "--verbose", action="store_true", help="print each round and the children's output")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- children


class Child:
    def __init__(self, argv: list[str], workdir: Path, log: Path, spawn: bool):
        self.log = log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        if spawn:
            with open(log, "wb") as out:
                self.proc = subprocess.Popen([sys.executable, "-m", "kdsweep.cli", *argv], cwd=workdir, env=env,
                                             stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            self.pid = self.proc.pid
        else:
            self.proc = None
            self.pid = os.fork()
            if self.pid == 0:  # the child: become `kdsweep study ...` and never return here
                code = 1
                try:
                    os.chdir(workdir)
                    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                    from kdsweep import cli

                    code = cli.main(argv)
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        self.status: int | None = None  # exit code, or -signal
        self.started = time.monotonic()
        self.resumes = False  # started to resume a killed worker's study

    def poll(self) -> int | None:
        if self.status is None:
            if self.proc is not None:
                self.status = self.proc.poll()
            else:
                pid, raw = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.status = os.waitstatus_to_exitcode(raw)
        return self.status

    def kill(self) -> int:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        return self.wait()

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                deadline = None
            time.sleep(0.02)
        return self.status

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


# --------------------------------------------------------------------------- reading the Optuna file while a child runs


def _query(db: Path, sql: str, args=()) -> list[tuple]:
    if not db.is_file():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []  # not created yet, or locked this instant


def running_owned_by(db: Path, pid: int) -> bool:
    rows = _query(db, "SELECT a.value_json FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
                      "WHERE t.state = 'RUNNING' AND a.key = 'kdsweep.owner'")
    for (value,) in rows:
        try:
            if json.loads(value).get("pid") == pid:
                return True
        except (ValueError, AttributeError):
            pass
    return False


def trial_seconds(db: Path, default: float = 1.0) -> float:
    """Median duration of the complete trials so far: how long to wait inside one."""
    rows = _query(db, "SELECT (julianday(datetime_complete) - julianday(datetime_start)) * 86400 FROM trials "
                      "WHERE state = 'COMPLETE' AND datetime_complete IS NOT NULL")
    times = sorted(r[0] for r in rows if r[0] is not None and r[0] > 0)
    return times[len(times) // 2] if times else default


def complete_values(db: Path) -> dict[int, float]:
    rows = _query(db, "SELECT t.number, v.value FROM trials t JOIN trial_values v ON v.trial_id = t.trial_id "
                      "WHERE t.state = 'COMPLETE'")
    return {int(n): float(v) for n, v in rows}


# --------------------------------------------------------------------------- the rounds


startup = [4.0]  # seconds from start to a first RUNNING trial, as last seen: the window of "anywhere" kills


def kill_at_random(child: Child, n: int, rng: random.Random, db: Path, args) -> dict:
    """SIGKILL a running child at a random point; return what happened."""
    now = time.monotonic()
    mode = "anywhere" if n % 3 == 0 else "in-trial"  # every third kill lands anywhere, start-up included
    if mode == "anywhere":
        target = now + rng.uniform(0.0, startup[0])
        while time.monotonic() < target and child.poll() is None:
            time.sleep(0.01)
    else:
        while not running_owned_by(db, child.pid) and child.poll() is None:
            if time.monotonic() - now > args.round_timeout:
                break
            time.sleep(0.02)
        seen = time.monotonic()
        if child.started > now - 0.5:  # it started with this round: learn how long start-up takes
            startup[0] = seen - child.started
        delay = rng.uniform(0.0, 1.2 * trial_seconds(db))
        while time.monotonic() < seen + delay and child.poll() is None:
            time.sleep(0.01)
    at = time.monotonic() - now
    status = child.kill()
    return {"mode": mode, "at": at, "killed": status == -signal.SIGKILL, "status": status}


def audit(workdir: Path, study_name: str, trials: int, completed_before: dict[int, float]) -> dict:
    import optuna
    from mlflow.tracking import MlflowClient

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{workdir / 'mlruns' / 'optuna.db'}")
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    ts = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in ts}
    states = Counter(t.state.name for t in ts)
    complete = [t for t in ts if t.state.name == "COMPLETE"]

    runs = []
    for exp in client.search_experiments():
        runs += client.search_runs([exp.experiment_id], max_results=10000)
    trial_runs = [r for r in runs if r.data.tags.get("kdsweep.role") == "trial" and r.data.tags.get("kdsweep.study") == study_name]
    parents = [r for r in runs if r.data.tags.get("kdsweep.role") == "study" and r.data.tags.get("kdsweep.study") == study_name]
    runs_per_number = Counter(int(r.data.tags["kdsweep.trial"]) for r in trial_runs)
    finished_runs = {int(r.data.tags["kdsweep.trial"]): r for r in trial_runs if r.info.status == "FINISHED"}

    lost = max(0, trials - len(complete))
    lost += sum(1 for num, value in completed_before.items()
                if num not in by_number or by_number[num].state.name != "COMPLETE" or by_number[num].value != value)
    lost += sum(1 for t in complete if t.number not in finished_runs or "test_acc" not in finished_runs[t.number].data.metrics)

    duplicates = max(0, len(complete) - trials)
    duplicates += sum(c - 1 for c in runs_per_number.values() if c > 1)
    duplicates += sum(1 for num in finished_runs if by_number.get(num) is None or by_number[num].state.name != "COMPLETE")
    params = Counter(tuple(sorted(t.params.items())) for t in complete)
    duplicates += sum(c - 1 for c in params.values() if c > 1)
    duplicates += max(0, len(parents) - 1)

    stuck = sum(1 for r in runs if r.info.status == "RUNNING") + states.get("RUNNING", 0)
    retries = sum(1 for t in ts if "kdsweep.retry_of" in t.user_attrs)
    return {"lost": lost, "duplicates": duplicates, "stuck_runs": stuck, "states": dict(states), "retries": retries,
            "mlflow_trial_runs": dict(Counter(r.info.status for r in trial_runs)),
            "parent": [r.info.status for r in parents]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.kills < 1 or args.workers < 1:
        sys.exit("--kills and --workers must be at least 1")
    trials = args.trials or 2 * args.kills + 2
    rng = random.Random(args.seed)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kdsweep-fault-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / "mlruns").exists():
        sys.exit(f"{workdir} already holds mlruns/: give a fresh --workdir")
    log_dir = workdir / "logs"
    log_dir.mkdir()
    db = workdir / "mlruns" / "optuna.db"
    study_name = f"fault-{args.method}-{args.seed}"
    cli_argv = ["study", args.method, "--dataset", args.dataset, "--data-size", str(args.data_size),
                "--trials", str(trials), "--epochs", str(args.epochs),
                "--pruner", "none", "--device", "cpu", "--study-name", study_name]
    os.environ.setdefault("KDSWEEP_CACHE", str(workdir / "cache"))
    if not args.spawn:
        # Pay the imports once, here; forked children start at cli.main.
        import torch

        from kdsweep import cli, study  # noqa: F401

        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # its first use imports torch._dynamo

    t0 = time.monotonic()
    kills = resumed = rounds = serial = 0
    completed: dict[int, float] = {}  # trial number -> value, for every trial seen COMPLETE after some round

    def start(resumes: bool) -> Child:
        nonlocal serial
        serial += 1
        child = Child(cli_argv, workdir, log_dir / f"run{serial:02d}.log", args.spawn)
        child.resumes = resumes
        return child

    def ended(child: Child) -> bool:
        """Account for a child that is gone; False if it failed."""
        nonlocal resumed
        if child.status == 0 or child.status == -signal.SIGKILL:
            resumed += child.resumes
            child.resumes = False  # count each resume once
            return True
        print(f"a worker exited with status {child.status}:\n{child.output()[-3000:]}")
        return False

    workers = [start(False) for _ in range(args.workers)]
    while kills < args.kills:
        rounds += 1
        if rounds > 6 * args.kills:
            print(f"gave up after {rounds} rounds and {kills} kills")
            return 1
        if any(w.poll() is not None for w in workers):
            # A worker left on its own: the study completed before the kills were done. Let the others
            # finish, then ask for more trials (a resume may raise --trials) and start again.
            for w in workers:
                w.wait(timeout=args.round_timeout)
                if not ended(w):
                    return 1
            trials += args.kills
            cli_argv[cli_argv.index("--trials") + 1] = str(trials)
            if args.verbose:
                print(f"round {rounds}: the study completed before the kills; --trials raised to {trials}")
            workers = [start(False) for _ in range(args.workers)]
            continue
        i = rng.randrange(len(workers))
        r = kill_at_random(workers[i], rounds, rng, db, args)
        if args.verbose:
            print(f"round {rounds}: {r['mode']} kill of worker {i} at {r['at']:.2f}s -> status {r['status']}", flush=True)
        if not ended(workers[i]):
            return 1
        if r["killed"]:
            kills += 1
            completed.update(complete_values(db))
            workers[i] = start(True)  # the same command again

    for w in workers:
        w.wait(timeout=args.round_timeout)
        if args.verbose:
            print(w.output()[-2000:])
        if w.status != 0:
            print(f"the final run of a worker exited with status {w.status}:\n{w.output()[-3000:]}")
            return 1
        ended(w)
    a = audit(workdir, study_name, trials, completed)
    print(f"kills={kills} resumed={resumed} lost={a['lost']} duplicates={a['duplicates']} stuck_runs={a['stuck_runs']}")
    print(f"  trials={trials} optuna={a['states']} retried={a['retries']} mlflow_trial_runs={a['mlflow_trial_runs']} "
          f"parent={a['parent']} workers={args.workers} runs={serial} seconds={time.monotonic() - t0:.0f} workdir={workdir}")
    ok = kills == args.kills and resumed == kills and a["lost"] == 0 and a["duplicates"] == 0 and a["stuck_runs"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
