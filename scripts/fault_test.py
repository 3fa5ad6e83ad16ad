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
--spawn.

Five more rounds (--rounds; all by default) attack what a kill does not, each
in its own directory under the workdir, and report what kdsweep did:

  store_deleted     a 2-trial study; its MLflow store deleted, then (on a copy)
                    its Optuna store deleted; each resumed: `refused` if every
                    resume exited 2 with one line on stderr and trained nothing.
                    Then `--on-mismatch repair` must resume both with exit 0
                    and the stores must agree (every COMPLETE trial with its
                    FINISHED run, every live trial run with its trial).
  teacher_mismatch  a vanilla_kd study on teacher A (1 epoch), resumed with
                    --teacher-checkpoint B (2 epochs): `refused` (exit 2, one
                    line, no trial added) or `accepted` (exit 0).
  teacher_swap      a vanilla_kd study on teacher A; A's file then overwritten with
                    teacher B: `confirm` must be `refused` (exit 2, one line naming
                    both digests, no confirmation run), and work with A put back.
  frozen_lock       a process holding the teacher cache's lock frozen with SIGSTOP;
                    a study that needs that teacher must be `refused` (exit 2, one
                    line naming the holder) once the holder's beat is older than
                    the grace period (3 s here), not wait for ever.
  disk_full         the stores on a 3 MB tmpfs filled to a few KB free (as root),
                    or else a file-size limit (RLIMIT_FSIZE) a few KB above the
                    stores' size: `exitN` is the status of the study that ran
                    out of space; it should be 2 with one line, and the study
                    must resume once there is space again, its stores agreeing.

    python scripts/fault_test.py --kills 5
    -> kills=5 resumed=5 lost=0 duplicates=0 stuck_runs=0 store_deleted=refused teacher_mismatch=refused
       teacher_swap=refused frozen_lock=refused disk_full=exit2

The exit status is 0 only if kills = resumed = K, the three other counts are 0
and every other round came out as expected above.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's kdsweep, not an installed one

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")


ROUNDS = ("kill", "store", "teacher", "swap", "frozen", "disk")


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
    p.add_argument("--rounds", default=",".join(ROUNDS),
                   help=f"comma-separated, of {', '.join(ROUNDS)} (default: all)")
    p.add_argument("--disk-mode", choices=["auto", "tmpfs", "fsize"], default="auto",
                   help="disk_full round: a 3 MB tmpfs (needs root) or a file-size limit (auto: tmpfs when it mounts)")
    p.add_argument("--disk-slack-kb", type=int, default=48, help="disk_full round: space left before the study resumes")
    p.add_argument("-v", "--verbose", action="store_true", help="print each round and the children's output")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- children


class Child:
    def __init__(self, argv: list[str], workdir: Path, log: Path, spawn: bool, err: Path | None = None,
                 fsize: int | None = None):
        """`kdsweep ARGV` in `workdir`: stdout to `log`, stderr too unless `err` is given; `fsize`: RLIMIT_FSIZE in bytes."""
        self.log, self.err = log, err
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        if spawn:
            with open(log, "wb") as out, open(err or os.devnull, "wb") as errf:
                self.proc = subprocess.Popen([sys.executable, "-m", "kdsweep.cli", *argv], cwd=workdir, env=env,
                                             stdout=out, stderr=errf if err else subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, preexec_fn=lambda: limit_file_size(fsize))
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
                    os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if err else fd, 2)
                    limit_file_size(fsize)
                    from kdsweep import cli

                    code = cli.main(argv)
                    cli.release()  # the stores closed, as the `kdsweep` command closes them: no -wal files left
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

    def errors(self) -> list[str]:
        """The non-blank lines the child wrote to stderr (when kept apart)."""
        try:
            return [line for line in self.err.read_text(errors="replace").splitlines() if line.strip()]
        except (OSError, AttributeError):
            return []


def limit_file_size(limit: int | None) -> None:
    """A quota without a mount: no file may grow past `limit` bytes; writes beyond fail (EFBIG) instead of killing."""
    if limit is not None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


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


@dataclass
class Result:
    summary: str  # fields of the summary line
    detail: str  # a line of what happened
    ok: bool


def kill_rounds(args, workdir: Path) -> Result:
    """The SIGKILL rounds in `workdir` (see the module docstring)."""
    trials = args.trials or 2 * args.kills + 2
    rng = random.Random(args.seed)
    log_dir = workdir / "logs"
    log_dir.mkdir()
    db = workdir / "mlruns" / "optuna.db"
    study_name = f"fault-{args.method}-{args.seed}"
    cli_argv = ["study", args.method, "--dataset", args.dataset, "--data-size", str(args.data_size),
                "--trials", str(trials), "--epochs", str(args.epochs),
                "--pruner", "none", "--device", "cpu", "--study-name", study_name]
    t0 = time.monotonic()
    kills = resumed = rounds = serial = 0
    completed: dict[int, float] = {}  # trial number -> value, for every trial seen COMPLETE after some round

    def failed(why: str) -> Result:
        print(why)
        return Result(f"kills={kills} resumed={resumed} failed", why.splitlines()[0], False)

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
            return failed(f"gave up after {rounds} rounds and {kills} kills")
        if any(w.poll() is not None for w in workers):
            # A worker left on its own: the study completed before the kills were done. Let the others
            # finish, then ask for more trials (a resume may raise --trials) and start again.
            for w in workers:
                w.wait(timeout=args.round_timeout)
                if not ended(w):
                    return failed(f"a worker exited with status {w.status}")
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
            return failed(f"a worker exited with status {workers[i].status}")
        if r["killed"]:
            kills += 1
            completed.update(complete_values(db))
            workers[i] = start(True)  # the same command again

    for w in workers:
        w.wait(timeout=args.round_timeout)
        if args.verbose:
            print(w.output()[-2000:])
        if w.status != 0:
            return failed(f"the final run of a worker exited with status {w.status}:\n{w.output()[-3000:]}")
        ended(w)
    a = audit(workdir, study_name, trials, completed)
    ok = kills == args.kills and resumed == kills and a["lost"] == 0 and a["duplicates"] == 0 and a["stuck_runs"] == 0
    return Result(f"kills={kills} resumed={resumed} lost={a['lost']} duplicates={a['duplicates']} stuck_runs={a['stuck_runs']}",
                  f"trials={trials} optuna={a['states']} retried={a['retries']} mlflow_trial_runs={a['mlflow_trial_runs']} "
                  f"parent={a['parent']} workers={args.workers} runs={serial} seconds={time.monotonic() - t0:.0f} "
                  f"workdir={workdir}", ok)


# --------------------------------------------------------------------------- the other attacks


def run(args, argv: list[str], cwd: Path, name: str, fsize: int | None = None) -> Child:
    """`kdsweep ARGV` in `cwd` to its end; its stdout in logs/NAME.log, its stderr apart in logs/NAME.err."""
    logs = cwd / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    child = Child(argv, cwd, logs / f"{name}.log", args.spawn, err=logs / f"{name}.err", fsize=fsize)
    child.wait(timeout=args.round_timeout)
    if args.verbose:
        print(f"  {name}: exit {child.status}, {len(child.errors())} stderr line(s)", *child.errors()[-3:], sep="\n    ")
    return child


def study_argv(args, method: str, name: str, trials: int, *extra: str) -> list[str]:
    return ["study", method, "--dataset", args.dataset, "--data-size", str(args.data_size), "--trials", str(trials),
            "--epochs", str(args.epochs), "--pruner", "none", "--device", "cpu", "--study-name", name, *extra]


def optuna_trials(mlruns: Path, study: str) -> dict[int, tuple[str, str | None]]:
    """number -> (state, recorded MLflow run id) of a study, read with sqlite3 (no client: children fork after this)."""
    db = mlruns / "optuna.db"
    rows = _query(db, "SELECT t.number, t.state, t.trial_id FROM trials t JOIN studies s ON s.study_id = t.study_id "
                      "WHERE s.study_name = ?", (study,))
    ids = dict(_query(db, "SELECT trial_id, value_json FROM trial_user_attributes WHERE key = 'mlflow_run_id'"))
    return {int(n): (state, json.loads(ids[tid]) if tid in ids else None) for n, state, tid in rows}


def mlflow_runs_of(mlruns: Path, study: str) -> list[dict]:
    """The active runs tagged with the study: id, status and tags, read with sqlite3."""
    db = mlruns / "mlflow.db"
    ids = {r for (r,) in _query(db, "SELECT run_uuid FROM tags WHERE key = 'kdsweep.study' AND value = ?", (study,))}
    runs = {rid: {"id": rid, "status": status, "tags": {}} for rid, status in
            _query(db, "SELECT run_uuid, status FROM runs WHERE lifecycle_stage = 'active'") if rid in ids}
    for rid, key, value in _query(db, "SELECT run_uuid, key, value FROM tags"):
        if rid in runs:
            runs[rid]["tags"][key] = value
    return list(runs.values())


def disagreement(mlruns: Path, study: str) -> str:
    """What the two stores disagree on ('' if nothing): a check of its own, not kdsweep's."""
    trials = optuna_trials(mlruns, study)
    runs = [r for r in mlflow_runs_of(mlruns, study) if r["tags"].get("kdsweep.state") != "ORPHANED"]
    trial_runs = [r for r in runs if r["tags"].get("kdsweep.role") == "trial"]
    stands_for = lambda r: r["tags"].get("kdsweep.stands_for", r["id"])  # noqa: E731 - a run re-created by repair
    finished = {stands_for(r) for r in trial_runs if r["status"] == "FINISHED"}
    problems = []
    no_run = [n for n, (state, rid) in trials.items() if state == "COMPLETE" and rid not in finished]
    if no_run:
        problems.append(f"complete trials without a FINISHED run: {sorted(no_run)}")
    no_trial = []
    for r in trial_runs:
        number = int(r["tags"].get("kdsweep.trial", -1))
        state, rid = trials.get(number, (None, None))
        # A trial killed before recording its run id holds none: its run is still its own.
        if state is None or (rid != stands_for(r) and not (rid is None and state != "COMPLETE")):
            no_trial.append(number)
    if no_trial:
        problems.append(f"trial runs without their trial: {no_trial}")
    parents = [r for r in runs if r["tags"].get("kdsweep.role") == "study"]
    if len(parents) != 1:
        problems.append(f"{len(parents)} live parent runs")
    stuck = sum(r["status"] == "RUNNING" for r in runs) + sum(s == "RUNNING" for s, _ in trials.values())
    if stuck:
        problems.append(f"{stuck} RUNNING")
    return "; ".join(problems)


def gist(child: Child, width: int = 100) -> str:
    """The line of stderr that says what happened: kdsweep's own, else the last exception line; shortened."""
    errors = child.errors()
    said = [line for line in errors if line.startswith("kdsweep:")]
    raised = [line for line in errors if not line[:1].isspace() and ("Error" in line.split(":")[0] or "Exception" in line)]
    line = (said or raised or errors or [""])[-1 if not said else 0]
    line = line if len(line) <= width else line[:width] + "..."
    return f" ({line})" if line else ""


def verdict(child: Child, trained: bool) -> str:
    """refused: exit 2, one line on stderr, nothing trained; accepted: exit 0; else exitN."""
    if child.status == 2 and len(child.errors()) == 1 and not trained:
        return "refused"
    return "accepted" if child.status == 0 else f"exit{child.status}"


def store_round(args, root: Path) -> Result:
    """Delete one store of a finished study and resume; then repair."""
    base = root / "base"
    base.mkdir(parents=True)
    first = run(args, study_argv(args, "ce", "store", 2), base, "first")
    if first.status != 0:
        return Result("store_deleted=setup_failed", f"store: the first study exited {first.status}: "
                      f"{(first.errors() or ['?'])[-1]}", False)
    outcomes, notes, ok = {}, [], True
    for which, lost in (("mlflow", ["mlflow.db", "artifacts"]), ("optuna", ["optuna.db"])):
        cwd = root / f"{which}-deleted"
        shutil.copytree(base / "mlruns", cwd / "mlruns")
        for name in lost:
            path = cwd / "mlruns" / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        before = len(optuna_trials(cwd / "mlruns", "store"))
        child = run(args, study_argv(args, "ce", "store", 3), cwd, "resume")
        outcomes[which] = verdict(child, trained=len(optuna_trials(cwd / "mlruns", "store")) != before)
        repaired = run(args, study_argv(args, "ce", "store", 3, "--on-mismatch", "repair"), cwd, "repair")
        differ = disagreement(cwd / "mlruns", "store") if repaired.status == 0 else f"exit {repaired.status}"
        ok &= outcomes[which] == "refused" and not differ
        notes.append(f"{which} deleted -> exit {child.status}, {len(child.errors())} stderr line(s){gist(child)}; "
                     f"--on-mismatch repair -> {differ or 'exit 0, the stores agree'}")
    value = "refused" if set(outcomes.values()) == {"refused"} else ",".join(f"{k}:{v}" for k, v in outcomes.items())
    return Result(f"store_deleted={value}", "store: " + "; ".join(notes), ok)


def _two_teachers(args, root: Path) -> str:
    """Teachers A (1 epoch) and B (2 epochs) as ROOT/A.pt and ROOT/B.pt; what went wrong, or ''. Both are weak, so the
    studies given them say --accept-teacher: these rounds are about which teacher, not how good."""
    for name, epochs in (("A", 1), ("B", 2)):
        child = run(args, ["teacher", "--dataset", args.dataset, "--data-size", str(args.data_size), "--device", "cpu",
                           "--epochs", str(epochs), "--out", str(root / f"{name}.pt")], root, f"teacher{name}")
        if child.status != 0:
            return f"training teacher {name} exited {child.status}"
    return ""


def teacher_round(args, root: Path) -> Result:
    """A study on one teacher, resumed with another."""
    root.mkdir(parents=True)
    failed = _two_teachers(args, root)
    if failed:
        return Result("teacher_mismatch=setup_failed", f"teacher: {failed}", False)
    first = run(args, study_argv(args, "vanilla_kd", "teach", 1, "--teacher-checkpoint", str(root / "A.pt"),
                                    "--accept-teacher"), root, "first")
    if first.status != 0:
        return Result("teacher_mismatch=setup_failed", f"teacher: the first study exited {first.status}: "
                      f"{(first.errors() or ['?'])[-1]}", False)
    before = len(optuna_trials(root / "mlruns", "teach"))
    child = run(args, study_argv(args, "vanilla_kd", "teach", 2, "--teacher-checkpoint", str(root / "B.pt"),
                                    "--accept-teacher"), root, "other")
    after = len(optuna_trials(root / "mlruns", "teach"))
    value = verdict(child, trained=after != before)
    return Result(f"teacher_mismatch={value}", f"teacher: study on teacher A (1 epoch) resumed with teacher B (2 epochs) "
                  f"-> exit {child.status}, {len(child.errors())} stderr line(s){gist(child)}, trials {before} -> {after}",
                  value == "refused")


def _confirm_runs(mlruns: Path) -> int:
    rows = _query(mlruns / "mlflow.db", "SELECT COUNT(*) FROM tags WHERE key = 'kdsweep.role' AND value = 'confirm'")
    return rows[0][0] if rows else 0


def swap_round(args, root: Path) -> Result:
    """A study on teacher A; A's file then replaced by teacher B; `confirm` must refuse, and work with A back."""
    root.mkdir(parents=True)
    failed = _two_teachers(args, root)
    if failed:
        return Result("teacher_swap=setup_failed", f"swap: {failed}", False)
    used = root / "used.pt"
    shutil.copy(root / "A.pt", used)
    first = run(args, study_argv(args, "vanilla_kd", "swap", 1, "--teacher-checkpoint", str(used), "--accept-teacher"), root, "first")
    if first.status != 0:
        return Result("teacher_swap=setup_failed", f"swap: the study exited {first.status}: "
                      f"{(first.errors() or ['?'])[-1]}", False)
    shutil.copy(root / "B.pt", used)
    child = run(args, ["confirm", "--seeds", "1", "--device", "cpu"], root, "confirm-swapped")
    value = verdict(child, trained=_confirm_runs(root / "mlruns") > 0)
    shutil.copy(root / "A.pt", used)
    back = run(args, ["confirm", "--seeds", "1", "--device", "cpu"], root, "confirm-restored")
    return Result(f"teacher_swap={value}", f"swap: confirm with the study's teacher file replaced by another -> exit "
                  f"{child.status}, {len(child.errors())} stderr line(s){gist(child)}; with it restored -> exit {back.status}",
                  value == "refused" and back.status == 0)


def frozen_round(args, root: Path) -> Result:
    """A process holding the teacher cache's lock is frozen (SIGSTOP); a study waiting for that teacher must stop
    in one line naming the holder once its beat is older than the grace period, not wait for ever."""
    root.mkdir(parents=True)
    cache = root / "cache"
    env = {**os.environ, "KDSWEEP_CACHE": str(cache), "KDSWEEP_HEARTBEAT": "1", "KDSWEEP_GRACE": "3",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    script = ("import os, sys, time; from pathlib import Path\n"
              "from kdsweep.training.teacher import cache_lock, cache_path\n"
              f"path = cache_path({args.dataset!r}, 'digitnet_l', 0, 1, {args.data_size}, 0.1)\n"
              "with cache_lock(path):\n    print('held', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True, cwd=root)
    saved = {k: os.environ.get(k) for k in ("KDSWEEP_CACHE", "KDSWEEP_HEARTBEAT", "KDSWEEP_GRACE")}
    try:
        if holder.stdout.readline().strip() != "held":
            return Result("frozen_lock=setup_failed", "frozen: the lock holder did not start", False)
        os.kill(holder.pid, signal.SIGSTOP)
        os.environ.update({k: env[k] for k in saved})  # forked children read the environment they inherit
        start = time.monotonic()
        child = run(args, study_argv(args, "vanilla_kd", "frozen", 1, "--teacher", "digitnet_l", "--teacher-epochs", "1"),
                    root, "waiter")
        took = time.monotonic() - start
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.kill(holder.pid, signal.SIGCONT)
        holder.kill()
        holder.wait()
    named = any(f":{holder.pid}" in line for line in child.errors())
    value = "refused" if child.status == 2 and len(child.errors()) == 1 and named else f"exit{child.status}"
    return Result(f"frozen_lock={value}", f"frozen: a study waiting on a frozen teacher-lock holder -> exit {child.status} "
                  f"after {took:.0f}s, {len(child.errors())} stderr line(s){gist(child, 160)}", value == "refused")


def mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return out.returncode == 0


def disk_round(args, root: Path) -> Result:
    """Run out of space mid-study, then free it and resume."""
    mlruns = root / "mlruns"
    mlruns.mkdir(parents=True)
    mode = args.disk_mode
    if mode in ("auto", "tmpfs"):
        if mount_tmpfs(mlruns, "3m"):
            mode = "tmpfs"
        elif mode == "tmpfs":
            return Result("disk_full=no_tmpfs", "disk: cannot mount a tmpfs (not root, or no permission)", False)
        else:
            mode = "fsize"
    try:
        first = run(args, study_argv(args, "ce", "disk", 1), root, "first")
        if first.status != 0:
            return Result("disk_full=setup_failed", f"disk: the first study exited {first.status}", False)
        slack = args.disk_slack_kb * 1024
        fsize = None
        if mode == "tmpfs":
            filler = mlruns / "filler"
            st = os.statvfs(mlruns)
            try:
                with open(filler, "wb") as f:
                    left = st.f_bavail * st.f_frsize - slack
                    while left > 0:
                        left -= f.write(b"\0" * min(left, 1 << 20))
            except OSError:
                pass
            st = os.statvfs(mlruns)
            where = f"a 3 MB tmpfs with {st.f_bavail * st.f_frsize // 1024} KB free"
        else:
            fsize = max(p.stat().st_size for p in mlruns.glob("*.db")) + slack
            where = f"RLIMIT_FSIZE {fsize // 1024} KB (the stores' size + {args.disk_slack_kb} KB)"
        full = run(args, study_argv(args, "ce", "disk", 40), root, "full", fsize=fsize)
        done = sum(s == "COMPLETE" for s, _ in optuna_trials(mlruns, "disk").values())  # 1 before this run
        if mode == "tmpfs":
            (mlruns / "filler").unlink(missing_ok=True)
        errors = full.errors()
        traceback = any(line.startswith("Traceback") for line in errors)
        value = "not_full" if full.status == 0 else f"exit{full.status}"
        resumed = run(args, study_argv(args, "ce", "disk", done + 1), root, "resume")
        differ = disagreement(mlruns, "disk") if resumed.status == 0 else f"exit {resumed.status}"
        ok = full.status == 2 and len(errors) == 1 and not differ
        return Result(f"disk_full={value}", f"disk: {where}: exit {full.status} after {done - 1} more complete trial(s), "
                      f"{len(errors)} stderr line(s){', a traceback' if traceback else ''}{gist(full)}; "
                      f"with space again -> {differ or 'exit 0, resumed, the stores agree'}", ok)
    finally:
        if mode == "tmpfs":
            if subprocess.run(["umount", str(mlruns)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mlruns)], capture_output=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    rounds = [r.strip() for r in args.rounds.split(",") if r.strip()]
    unknown = set(rounds) - set(ROUNDS)
    if unknown or not rounds:
        sys.exit(f"--rounds takes some of {', '.join(ROUNDS)}")
    if ("kill" in rounds and args.kills < 1) or args.workers < 1:
        sys.exit("--kills and --workers must be at least 1")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kdsweep-fault-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / "mlruns").exists():
        sys.exit(f"{workdir} already holds mlruns/: give a fresh --workdir")
    os.environ.setdefault("KDSWEEP_CACHE", str(workdir / "cache"))
    if not args.spawn:
        # Pay the imports once, here; forked children start at cli.main.
        import torch


        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # its first use imports torch._dynamo

    attacks = {"kill": lambda: kill_rounds(args, workdir), "store": lambda: store_round(args, workdir / "store"),
               "teacher": lambda: teacher_round(args, workdir / "teacher"), "swap": lambda: swap_round(args, workdir / "swap"),
               "frozen": lambda: frozen_round(args, workdir / "frozen"), "disk": lambda: disk_round(args, workdir / "disk")}
    # The kill rounds last: their audit opens the stores with MLflow's and Optuna's clients in this process, and
    # children forked after that would inherit open database connections.
    done = {r: attacks[r]() for r in sorted(rounds, key=lambda r: r == "kill")}
    results = [done[r] for r in ROUNDS if r in done]
    print(" ".join(r.summary for r in results))
    for r in results:
        print(f"  {r.detail}")
    ok = all(r.ok for r in results)
    if ok and not args.workdir:  # a folder of its own that passed: nothing to look at
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"  stores and logs kept in {workdir}")
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
