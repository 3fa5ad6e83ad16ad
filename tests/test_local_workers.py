"""--processes N: one command as N worker processes on this machine (kdsweep/study/local_workers.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState, create_trial
from reliability_helpers import cli_env, load_trials, mlflow_runs, run_cli, start_cli

from kdsweep.common import processes
from kdsweep.common.locks import StudyLock
from kdsweep.common.processes import COMMAND_ENV, Owner, _start_time
from kdsweep.study import local_workers
from kdsweep.study import loop as study_loop
from kdsweep.study.budget import Budget, Spent
from kdsweep.study.workers import claim
from kdsweep.tracking.vocabulary import EPOCHS_ATTR

TINY = ["--dataset", "digits", "--device", "cpu", "--epochs", "2", "--sampler", "random", "--pruner", "none"]


def test_each_worker_runs_the_users_command_with_flags_that_override_it(monkeypatch):
    monkeypatch.setattr(processes, "cores", lambda: 8)
    argv = ["sweep", "--methods", "ce,pkt", "--parallel", "16"]
    assert local_workers.worker_argv(argv, 2, None, 0) == [*argv, "--processes", "1", "--cpu-workers", "4"]
    assert local_workers.worker_argv(argv, 2, None, 1) == [*argv, "--processes", "1", "--cpu-workers", "4", "--quiet"]
    assert local_workers.worker_argv(argv, 3, 2, 2) == [*argv, "--processes", "1", "--quiet"]  # the user's own count
    assert local_workers.worker_argv(argv, 16, None, 0)[-1] == "1"  # at least one thread each


def test_a_worker_runs_torch_on_its_share_of_the_cores_from_its_first_op(tmp_path, monkeypatch):
    """Two workers that each start on every core spin their idle threads against each other's work: on 2 cores a
    sweep's pair checks took 1.8 s instead of 0.1, and a digits study trained on twice its cores. A worker's threads
    are its share, unless the user set $OMP_NUM_THREADS, and are set before a sweep's or a study's pair check."""
    import torch

    from kdsweep import api
    from kdsweep.study import pairs
    from kdsweep.training.devices import prepare_cpu

    class Checked(Exception):
        pass

    def check(cfg):
        seen.append(torch.get_num_threads())
        raise Checked

    before, seen = torch.get_num_threads(), []
    monkeypatch.setattr(processes, "cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert prepare_cpu() == 8 and prepare_cpu(default=1) == 1  # alone: every core, or the dataset's own
        monkeypatch.setenv(processes.PROCESSES_ENV, "2")
        assert prepare_cpu() == 4 and prepare_cpu(default=1) == 1 and prepare_cpu(default=6) == 4
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert prepare_cpu(default=1) == 3  # the user's own choice
        monkeypatch.delenv("OMP_NUM_THREADS")
        stores = {"storage": f"sqlite:///{tmp_path}/optuna.db", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
        for run in (lambda: api.plan_sweep("ce,pkt", dataset="digits", device="cpu", **stores),
                    lambda: api.study("ce", dataset="digits", device="cpu", **stores)):
            torch.set_num_threads(8)  # torch's own default: every core
            monkeypatch.setattr(pairs, "pair_problem", check)
            monkeypatch.setattr(study_loop, "check_pair", check)
            with pytest.raises(Checked):
                run()
        assert seen == [4, 4]
    finally:
        torch.set_num_threads(before)


def test_a_worker_of_several_claims_its_share_of_what_can_run_now(monkeypatch):
    def ctx(budget, done, running):
        trials = [create_trial(state=TrialState.COMPLETE, value=0.5, user_attrs={EPOCHS_ATTR: 5})] * done
        trials += [create_trial(state=TrialState.RUNNING)] * running
        return SimpleNamespace(cfg=SimpleNamespace(budget=budget), study=SimpleNamespace(get_trials=lambda **kw: trials))

    resume = [ctx(Budget(10, None, 5), 8, 0), ctx(Budget(None, 50, 5), 8, 0)]  # 2 + 2 trials left
    assert study_loop._share(resume, 16) == 16  # alone (no --processes): --parallel, as before
    monkeypatch.setenv(processes.PROCESSES_ENV, "2")
    assert study_loop._share(resume, 16) == 2  # the first to ask takes half, not all four
    after = [ctx(Budget(10, None, 5), 8, 1), ctx(Budget(None, 50, 5), 8, 1)]  # the first took them: 2 + 2 running
    assert study_loop._share(after, 16) == 2  # the second takes the other half
    fresh = [ctx(Budget(None, 240, 30), 0, 0) for _ in range(4)]  # a 4-method sweep of 8 trials each
    assert study_loop._share(fresh, 16) == 16 and study_loop._share(fresh, 8) == 8  # never above --parallel
    monkeypatch.setenv(processes.PROCESSES_ENV, "3")
    assert study_loop._share([ctx(Budget(10, None, 5), 9, 0)], 16) == 1  # at least one
    assert study_loop._share([ctx(Budget(None, None, 5), 0, 0)], 16) == 16  # no limit: nothing to share out


def test_each_worker_of_several_deals_from_its_own_slice_of_a_sweeps_studies_first(monkeypatch):
    class Study(SimpleNamespace):  # a study with `left` trials to claim
        def take(self):
            if not self.left:
                return None
            self.left -= 1
            return self.name

    monkeypatch.setattr(study_loop, "_claim_next", Study.take)

    def group(left, size, turn=0):
        studies = [Study(name=name, left=n) for name, n in zip("ABCD", left)]
        return "".join(sorted(t for _, t in study_loop._claim_group(studies, size, set(), turn)))

    assert group([8, 8, 8, 8], 16) == "AAAABBBBCCCCDDDD"  # alone: round-robin over every study
    monkeypatch.setenv(processes.PROCESSES_ENV, "2")
    monkeypatch.setenv(processes.INDEX_ENV, "0")
    assert group([8, 8, 8, 8], 16) == "AAAAAAAACCCCCCCC"  # the first worker's slice: A and C, dealt in turn
    assert group([8, 8, 8, 8], 5, turn=1) == "AACCC"  # taking turns within it (turn 0: AAACC)
    assert group([8, 8, 3, 8], 16) == "AAAAAAAABBBCCCDD"  # its slice short: the others' studies fill the group
    monkeypatch.setenv(processes.INDEX_ENV, "1")
    assert group([8, 8, 8, 8], 16) == "BBBBBBBBDDDDDDDD"
    assert group([8, 0, 8, 0], 4) == "AACC"  # its slice done: helps with the rest
    monkeypatch.setenv(processes.PROCESSES_ENV, "3")
    monkeypatch.setenv(processes.INDEX_ENV, "0")
    assert group([2, 2, 2, 2], 4) == "AADD"  # slices of 4 studies among 3 workers: A D | B | C
    monkeypatch.setenv(processes.INDEX_ENV, "2")
    assert group([2, 2, 2, 2], 2) == "CC"


def test_a_worker_imports_its_commands_kdsweep_whatever_the_working_directory_holds(tmp_path, monkeypatch):
    # Run from another clone, `python -m kdsweep.cli` would import the clone's kdsweep: the working directory comes first.
    (tmp_path / "kdsweep").mkdir()
    (tmp_path / "kdsweep" / "__init__.py").write_text("raise SystemExit('the working directory kdsweep')\n")
    monkeypatch.chdir(tmp_path)
    with tempfile.TemporaryFile("w+") as log:
        worker = local_workers._start(["methods"], 2, 1, "test", log)
        assert worker.wait(timeout=300) == 0
        log.seek(0)
        assert "working directory" not in log.read()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # asks as a worker does
def test_a_fellows_claim_is_read_whole_never_as_a_trial_running_elsewhere(tmp_path, monkeypatch):
    """A worker claims a trial and then writes its owner, under the study lock. A fellow worker of the same command
    opening the study meanwhile waits for the lock, so it never counts the half-made claim as running elsewhere
    (as the two-worker sweep below once said when its workers started a moment apart)."""
    monkeypatch.setenv(COMMAND_ENV, "the-command")
    monkeypatch.setenv(processes.PROCESSES_ENV, "2")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="s", direction="maximize")
    me = Owner.me()
    fellow = Owner(me.node, me.host, os.getppid(), _start_time(os.getppid()), "the-command")  # alive, not this process
    asked, release, seen = threading.Event(), threading.Event(), []

    def fellow_claims():
        with StudyLock(url, "s"):
            trial = optuna.load_study(study_name="s", storage=url).ask()  # RUNNING, no owner yet
            asked.set()
            release.wait(10)
            claim(trial, fellow)

    def opens_the_study():
        seen.append(study_loop._seen_whole(SimpleNamespace(lock=StudyLock(url, "s"), study=study)))

    claimer = threading.Thread(target=fellow_claims)
    claimer.start()
    assert asked.wait(10)
    reader = threading.Thread(target=opens_the_study)
    reader.start()
    reader.join(0.5)
    assert reader.is_alive(), "read the study while a claim was half made"
    release.set()
    claimer.join(10), reader.join(10)
    (trials, now, fellows), = seen
    assert len(trials) == now.running == fellows == 1


def test_two_worker_processes_share_a_sweeps_budget_exactly_and_report_once(tmp_path):
    # ce needs no teacher (none trained here); trials long enough (1,400 images, batch 4: about 0.4 s) that both
    # workers train some, as in test_budget. --parallel 8 could take all 8 trials at once: each worker takes its half.
    args = ["sweep", "--methods", "ce", "--trials", "8", "--data-size", "1400", "--batch-size", "4", "--processes", "2",
            "--parallel", "8", *TINY]
    out = run_cli(args, tmp_path, cli_env(tmp_path), timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("2 worker processes on this machine (--cpu-workers 1 each on a CPU)")
    summaries = [line for line in out.stdout.splitlines() if line.startswith("study ce-") and " complete, " in line]
    assert len(summaries) == 1, out.stdout  # the first worker's; the others ran --quiet
    # the other worker's trials are this command's own: not said as running elsewhere, nor waited for per study
    assert "running elsewhere" not in out.stdout and "would complete study" not in out.stdout, out.stdout
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    (name,) = _names(storage)
    trials = load_trials(storage, name)
    spent = Spent.of(trials)
    assert spent.running == 0 and spent.trials == len(trials) == 8
    owners = [t.user_attrs["kdsweep.owner"]["pid"] for t in trials]
    assert len(set(owners)) == 2, "each worker trained some: the first to ask did not take all 8"  # 4 + 4 unless one was slow to start
    runs, _ = mlflow_runs(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", name)
    assert len(runs) == 8 and {r.data.params["processes"] for r in runs} == {"2"}  # recorded with the threads
    # trained in lockstep groups: the report's cost column says its seconds are the groups'
    out = run_cli(["report", "--dataset", "digits", "--device", "cpu", "--no-log"], tmp_path,
                  cli_env(tmp_path), timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "is charged its whole group's time" in out.stdout, out.stdout


@pytest.mark.slow  # a two-method sweep, then its confirmation as two worker processes
def test_confirm_as_two_worker_processes_shares_out_each_seed_and_counts_every_seed_as_its_own(tmp_path):
    from mlflow.tracking import MlflowClient

    env = cli_env(tmp_path)
    sweep = ["sweep", "--methods", "ce,vanilla_kd", "--trials", "1", "--teacher-epochs", "1", "--data-size", "1400",
             "--batch-size", "4", *TINY]
    out = run_cli(sweep, tmp_path, env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    out = run_cli(["confirm", "--dataset", "digits", "--device", "cpu", "--seeds", "2", "--processes", "2"], tmp_path, env,
                  timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    # The first worker's table: the seeds its fellow trained are the command's own, not "reused".
    assert out.stdout.splitlines()[-2:] == ["ce: 0 reused, 2 trained, 0 failed", "vanilla_kd: 0 reused, 2 trained, 0 failed"]
    assert "left to it" not in out.stderr and "meanwhile" not in out.stderr, out.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id], "tags.`kdsweep.role` = 'confirm'")]
    assert sorted((r.data.tags["kdsweep.method"], r.data.tags["kdsweep.confirm_seed"]) for r in runs) == \
        [("ce", "1"), ("ce", "2"), ("vanilla_kd", "1"), ("vanilla_kd", "2")]
    assert {(r.info.status, r.data.tags["kdsweep.state"], r.data.params["processes"]) for r in runs} == {("FINISHED", "COMPLETE", "2")}
    owners = {json.loads(r.data.tags["kdsweep.owner"])["pid"] for r in runs}
    assert len(owners) == 2, "each worker took its share of each seed"  # unless one was slow to start
    assert len({json.loads(r.data.tags["kdsweep.owner"])["command"] for r in runs}) == 1, "the workers of one command"


def test_bad_input_is_said_once_with_exit_2(tmp_path):
    out = run_cli(["study", "no_such_method", "--processes", "2", *TINY], tmp_path, cli_env(tmp_path))
    assert out.returncode == 2
    assert out.stderr.count("kdsweep: error: unknown method 'no_such_method'") == 1, out.stderr
    out = run_cli(["study", "ce", "--processes", "0", *TINY], tmp_path, cli_env(tmp_path))
    assert out.returncode == 2 and out.stderr.strip() == "kdsweep: error: --processes must be at least 1, not 0"


# A 30-trial study as two workers: trials of about 0.4 s, so there is time to stop it mid-study.
STUDY = ["study", "ce", "--trials", "30", "--data-size", "1400", "--batch-size", "4", "--processes", "2",
         "--study-name", "shared", *TINY]


def _started_with_two_workers(tmp_path):
    """The command started, once both of its workers have claimed a trial: (the command, its Optuna store file)."""
    db = tmp_path / "mlruns" / "optuna.db"
    parent = start_cli(STUDY, tmp_path, cli_env(tmp_path), log=tmp_path / "run.log")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(_owners(db)) < 2:
        assert parent.poll() is None, (tmp_path / "run.log").read_text()
        time.sleep(0.5)
    return parent, db


@pytest.mark.slow  # two workers started, stopped mid-study, then resumed
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_a_signal_to_the_command_stops_every_worker_and_the_study_resumes(tmp_path, signum, code):
    parent, db = _started_with_two_workers(tmp_path)
    workers = _owners(db)
    parent.send_signal(signum)
    assert parent.wait(timeout=120) == code, (tmp_path / "run.log").read_text()
    # Killed outright, the parent cannot pass anything on: the kernel sends the workers SIGTERM (PR_SET_PDEATHSIG).
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.5)
    assert not any(_alive(pid) for pid in workers), "no worker outlives the command"
    trials = load_trials(f"sqlite:///{db}", "shared")
    assert not [t for t in trials if t.state.name == "RUNNING"], "every worker ended its trial"
    assert Spent.of(trials).trials < 30
    out = run_cli(STUDY, tmp_path, cli_env(tmp_path), timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert Spent.of(load_trials(f"sqlite:///{db}", "shared")).trials == 30


@pytest.mark.slow  # two workers, one killed mid-study
def test_a_worker_killed_mid_study_is_said_and_the_other_finishes_the_budget_exactly(tmp_path):
    parent, db = _started_with_two_workers(tmp_path)
    (second,) = [pid for pid in _owners(db) if "--quiet" in open(f"/proc/{pid}/cmdline").read().split("\0")]
    os.kill(second, signal.SIGKILL)  # the OOM killer's way
    assert parent.wait(timeout=600) == 137
    log = (tmp_path / "run.log").read_text()
    assert "worker 2 of 2 failed (killed by signal 9)" in log, log
    trials = load_trials(f"sqlite:///{db}", "shared")
    spent = Spent.of(trials)
    assert spent.running == 0 and spent.trials == 30, "the first worker retried the lost trial and spent the rest"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie is dead, only not yet reaped
    except (ProcessLookupError, FileNotFoundError):
        return False


def _names(storage: str) -> list[str]:
    import optuna

    return optuna.get_all_study_names(storage)


def _owners(db) -> set[int]:
    """The pids that own the study's trials, read from the SQLite file read-only: opening it through Optuna while
    the workers start would create Optuna's tables beside them, outside their lock (a worker then failed with
    `UNIQUE constraint failed: alembic_version.version_num`)."""
    if not db.exists():
        return set()
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
            rows = conn.execute("SELECT value_json FROM trial_user_attributes WHERE key = 'kdsweep.owner'").fetchall()
    except sqlite3.OperationalError:  # no tables yet
        return set()
    return {json.loads(v)["pid"] for (v,) in rows}


def test_a_worker_knows_the_other_workers_of_its_command():
    # Owners as recorded by processes started with a command's id, or alone: a worker's fellows are the other
    # workers of its command, live or exited; not itself, not another command's workers, not a lone process.
    code = ("import json, os, sys; from kdsweep.common.processes import COMMAND_ENV, Owner\n"
            "me = Owner.me(); print(json.dumps(me.as_attr()))\n"
            "others = [Owner.from_attr(json.loads(a)) for a in sys.argv[1:]]\n"
            "print(*[o.is_fellow() for o in others], me.is_fellow())")

    def owner(command, *others):
        env = {**os.environ, COMMAND_ENV: command} if command else {k: v for k, v in os.environ.items() if k != COMMAND_ENV}
        out = subprocess.run([sys.executable, "-c", code, *others], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr
        attr, fellows = out.stdout.splitlines()
        return attr, fellows.split()

    first, _ = owner("c1")
    other_command, _ = owner("c2")
    alone, _ = owner("")
    assert "command" not in json.loads(alone), "a command started alone records what it always did"
    _, fellows = owner("c1", first, other_command, alone)  # a second worker of c1, after the first has exited
    assert fellows == ["True", "False", "False", "False"]
    _, fellows = owner("", first, alone)
    assert fellows == ["False", "False", "False"]
