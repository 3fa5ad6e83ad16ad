"""Several workers, one study, on a real PostgreSQL server and a real `mlflow server` (both on loopback).

The PostgreSQL server is given, never installed or started here: KDSWEEP_TEST_POSTGRES names it,
postgresql://USER:PASSWORD@HOST:PORT/DBNAME, with a user that may create databases. `.ci/run`
starts a throwaway one on loopback (installing Debian's `postgresql` package first where it is
missing) with `.ci/postgres`; by hand:

    eval "$(bash .ci/postgres start /tmp/kdsweep-pg)"; python -m pytest tests/test_postgres.py
    bash .ci/postgres stop /tmp/kdsweep-pg

The test creates its own database on that server and drops it after the module. It skips, saying
why, where no server is given, and fails where the one given cannot be reached.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import defaultdict
from urllib.parse import urlsplit, urlunsplit

import pytest
from reliability_helpers import (
    cli_env,
    free_port,
    load_trials,
    mlflow_runs,
    start_cli,
    stop,
    wait_for,
)

# Three workers, a PostgreSQL server and an MLflow server: the slow tier, which .ci/run gives a server.
pytestmark = pytest.mark.slow

TRIALS = 6
WORKERS = 3
SERVER = "KDSWEEP_TEST_POSTGRES"


def _skip(reason: str):
    print(f"\nPostgreSQL test skipped: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def postgres():
    pytest.importorskip("psycopg2", reason="psycopg2 is missing: pip install -e '.[test]' (it has psycopg2-binary)")
    import psycopg2

    given = os.environ.get(SERVER)
    if not given:
        _skip(f"no PostgreSQL server given: set {SERVER}=postgresql://USER:PASSWORD@HOST:PORT/DB "
              f"(`eval \"$(bash .ci/postgres start DIR)\"` starts one; .ci/run does)")
    url = urlsplit(given)
    if not (url.hostname and url.username and url.password):
        _skip(f"{SERVER} must name a host, a user and a password (the test checks the password is never written)")
    server = {"host": url.hostname, "port": url.port or 5432, "user": url.username, "password": url.password}
    try:
        con = psycopg2.connect(**server, dbname=url.path.lstrip("/") or "postgres", connect_timeout=10)
    except psycopg2.OperationalError as e:  # a server was promised: not having it is a failure, not a skip
        pytest.fail(f"the PostgreSQL server {SERVER} names cannot be reached: {str(e).strip().splitlines()[0]}")
    con.autocommit = True
    db = f"kdsweep_test_{uuid.uuid4().hex[:12]}"
    con.cursor().execute(f"CREATE DATABASE {db}")
    try:
        yield {"url": urlunsplit(("postgresql", url.netloc, "/" + db, "", "")), "db": db, **server}
    finally:
        con.cursor().execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        con.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                 f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("mlflow server did not start:\n" + (root / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield {"url": url, "db": root / "mlflow.db", "root": root}
    finally:
        stop(proc)


def test_workers_share_one_study_on_postgres_and_an_mlflow_server(postgres, mlflow_server, tmp_path):
    storage, tracking = postgres["url"], mlflow_server["url"]
    args = ["study", "ce", "--dataset", "digits", "--data-size", "300", "--epochs", "2", "--pruner", "none",
            "--device", "cpu", "--trials", str(TRIALS), "--study-name", "pg", "--storage", storage,
            "--tracking-uri", tracking]
    env = cli_env(tmp_path)
    env.pop(SERVER, None)  # the workers know the password only from --storage
    procs = []
    for i in range(WORKERS):  # each in its own directory, as on its own machine
        home = tmp_path / f"worker{i}"
        home.mkdir()
        procs.append((home, start_cli(args, home, env, log=home / "out.log")))
    deadline = time.monotonic() + 480
    for home, p in procs:
        try:
            p.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for _, q in procs:
                q.kill()
            pytest.fail("workers did not finish:\n" + "\n".join((h / "out.log").read_text()[-1500:] for h, _ in procs))
    outputs = [(home / "out.log").read_text() for home, _ in procs]
    for (home, p), out in zip(procs, outputs):
        assert p.returncode == 0, out

    from kdsweep.study.optuna_storage import _with_driver

    trials = load_trials(_with_driver(storage), "pg")  # postgresql+psycopg2:// unless psycopg (3) is installed
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == TRIALS, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    assert len({t.number for t in trials}) == len(trials)
    per_worker = defaultdict(list)
    for t in complete:
        per_worker[t.user_attrs["kdsweep.owner"]["pid"]].append(t.number)
    print(f"\n{TRIALS} complete trials from {len(per_worker)} workers: "
          + "; ".join(f"worker pid {pid}: trials {sorted(nums)}" for pid, nums in sorted(per_worker.items())))
    assert len(per_worker) >= 2, "at least two workers ran trials"

    runs, parents = mlflow_runs(tracking, "pg")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", [p.info.status for p in parents]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in runs)
    numbers = [int(r.data.tags["kdsweep.trial"]) for r in runs]
    assert sorted(numbers) == sorted(t.number for t in trials if t.user_attrs.get("mlflow_run_id"))
    finished = {int(r.data.tags["kdsweep.trial"]) for r in runs if r.info.status == "FINISHED"}
    assert finished == {t.number for t in complete}
    assert not [r for r in runs if r.info.status == "RUNNING"]

    # The password is in the storage URL every worker was given: it must be nowhere else.
    PASSWORD = postgres["password"]
    for out in outputs:
        assert PASSWORD not in out
    assert PASSWORD.encode() not in mlflow_server["db"].read_bytes()
    for r in runs + parents:
        assert PASSWORD not in repr(r.data.params) + repr(r.data.tags)
    import psycopg2

    con = psycopg2.connect(host=postgres["host"], port=postgres["port"], user=postgres["user"], password=PASSWORD,
                           dbname=postgres["db"])
    try:
        cur = con.cursor()
        for table in ("study_user_attributes", "study_system_attributes", "trial_user_attributes", "trial_system_attributes"):
            cur.execute(f"SELECT count(*) FROM {table} WHERE value_json LIKE %s", (f"%{PASSWORD}%",))
            assert cur.fetchone()[0] == 0, table
    finally:
        con.close()


def test_a_password_holding_hash_slash_and_question_mark_is_never_written(postgres, tmp_path):
    """Attack (issue 21): a password with '#', '?' or '/' connects (SQLAlchemy reads it whole), but a URL parser
    that stops at those characters printed the rest of it: in the summary, the parent run's description, status,
    status --json, the report and its copies in MLflow, and error lines."""
    import psycopg2

    password, user, db = "s3c#re/t?x", f"kdh_{uuid.uuid4().hex[:8]}", f"kdsweep_hash_{uuid.uuid4().hex[:8]}"
    admin = {k: postgres[k] for k in ("host", "port", "user", "password")}
    con = psycopg2.connect(**admin, dbname=postgres["db"], connect_timeout=10)
    con.autocommit = True
    cur = con.cursor()
    cur.execute(f"CREATE ROLE {user} LOGIN PASSWORD %s", (password,))
    cur.execute(f"CREATE DATABASE {db} OWNER {user}")
    storage = f"postgresql://{user}:{password}@{postgres['host']}:{postgres['port']}/{db}"
    wrong = f"postgresql://{user}:wr#ong/pw@{postgres['host']}:{postgres['port']}/{db}"
    try:
        env = cli_env(tmp_path)
        env.pop(SERVER, None)
        runs = []
        for argv in (["study", "ce", "--dataset", "digits", "--data-size", "300", "--epochs", "1", "--trials", "1",
                      "--pruner", "none", "--device", "cpu", "--storage", storage],
                     ["status", "--storage", storage], ["status", "--json", "--storage", storage],
                     ["report", "--no-plots", "--out", "R", "--format", "md,html,json"], ["status", "--storage", wrong]):
            runs.append(subprocess.run([sys.executable, "-m", "kdsweep.cli", *argv], cwd=tmp_path, env=env,
                                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL))
        assert [r.returncode for r in runs] == [0, 0, 0, 0, 2], [r.stderr[-800:] for r in runs]
        assert f"{user}:***@" in runs[1].stdout + runs[1].stderr
        written = "".join(r.stdout + r.stderr for r in runs)
        written += "".join(p.read_text(errors="replace") for p in (tmp_path / "R").iterdir() if p.is_file())
        written += (tmp_path / "mlruns" / "mlflow.db").read_bytes().decode("latin-1")  # params, tags, descriptions
        for p in (tmp_path / "mlruns").rglob("*"):  # the report's copies logged to MLflow
            if p.is_file() and p.suffix in (".md", ".html", ".json", ".txt"):
                written += p.read_text(errors="replace")
        for secret in (password, "s3c#re", "re/t?x", "s3c%23re", "wr#ong", "ong/pw"):
            assert secret not in written, f"{secret!r} was written"
    finally:
        cur.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        cur.execute(f"DROP ROLE IF EXISTS {user}")
        con.close()


# --------------------------------------------------------------------------- many hosts, one teacher (issue 24)

KD_HOSTS = ["study", "vanilla_kd", "--dataset", "digits", "--data-size", "300", "--epochs", "1", "--pruner", "none",
            "--device", "cpu", "--trials", str(TRIALS)]


def _host_env(tmp_path, home, postgres, mlflow_server):
    """A worker as on a host of its own: its own directory and teacher cache; the stores from the environment,
    as the SLURM and Kubernetes recipes give them (docs/multi-worker.md), never on the command line."""
    env = cli_env(tmp_path, KDSWEEP_CACHE=str(home / "cache"), KDSWEEP_STORAGE=postgres["url"],
                  MLFLOW_TRACKING_URI=mlflow_server["url"])
    env.pop(SERVER, None)
    return env


def _start_host(tmp_path, name, args, postgres, mlflow_server):
    home = tmp_path / name
    home.mkdir()
    return home, start_cli(args, home, _host_env(tmp_path, home, postgres, mlflow_server), log=home / "out.log")


def _wait_all(procs, seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    for home, p in procs:
        try:
            p.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for _, q in procs:
                q.kill()
            pytest.fail("workers did not finish:\n" + "\n".join((h / "out.log").read_text()[-1500:] for h, _ in procs))
    return [(home / "out.log").read_text() for home, _ in procs]


def _teacher_runs(tracking: str, teacher_epochs: int) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name("teachers")
    if exp is None:
        return []
    key = f"digits-digitnet_l-s0-e{teacher_epochs}-n300.pt"
    return client.search_runs([exp.experiment_id], f"tags.`kdsweep.teacher_key` = '{key}'")


def _check_study(storage: str, tracking: str, name: str) -> None:
    """Exactly --trials complete trials, none left running, one parent run, no MLflow run left RUNNING."""
    from kdsweep.study.optuna_storage import _with_driver

    trials = load_trials(_with_driver(storage), name)
    assert len([t for t in trials if t.state.name == "COMPLETE"]) == TRIALS, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    runs, parents = mlflow_runs(tracking, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", [p.info.status for p in parents]
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_two_hosts_train_one_teacher_and_the_other_fetches_it(postgres, mlflow_server, tmp_path):
    storage, tracking = postgres["url"], mlflow_server["url"]
    args = [*KD_HOSTS, "--teacher-epochs", "40", "--study-name", "hosts"]
    procs = [_start_host(tmp_path, f"host{i}", args, postgres, mlflow_server) for i in range(2)]
    outputs = _wait_all(procs, 480)
    for (home, p), out in zip(procs, outputs):
        assert p.returncode == 0, out
    trained = [out for out in outputs if "training one now" in out]
    fetched = [out for out in outputs if "Fetched teacher" in out and "from the tracking server" in out]
    assert len(trained) == 1 and len(fetched) == 1, outputs
    print(f"\nthe fetching worker said: {[line for line in fetched[0].splitlines() if 'Fetched' in line][0]}")

    (run,) = _teacher_runs(tracking, 40)  # one teacher trained, and published with its weights
    assert run.info.status == "FINISHED"
    caches = [list((home / "cache" / "teachers").glob("*.pt")) for home, _ in procs]
    assert [len(c) for c in caches] == [1, 1]  # each host holds its own copy: nothing was shared
    from kdsweep.common.digests import model_digest
    from kdsweep.training import checkpoint

    digests = {model_digest(checkpoint.load_model(c[0])[0]) for c in caches}
    assert digests == {run.data.tags["kdsweep.teacher_sha256"]}
    _check_study(storage, tracking, "hosts")
    for out in outputs:
        assert postgres["password"] not in out


def test_a_worker_killed_training_the_teacher_is_taken_over_and_nothing_stays_running(postgres, mlflow_server, tmp_path):
    storage, tracking = postgres["url"], mlflow_server["url"]
    epochs = 400  # long enough to kill it mid-training, short enough to train again
    args = [*KD_HOSTS, "--teacher-epochs", str(epochs), "--study-name", "takeover"]
    first = _start_host(tmp_path, "host0", args, postgres, mlflow_server)

    def training():
        runs = [r for r in _teacher_runs(tracking, epochs) if r.info.status == "RUNNING"]
        return runs and "val_acc" in runs[0].data.metrics and runs[0]  # an epoch logged: mid-training

    run = wait_for(training, 240, first[1], every=0.5)
    second = _start_host(tmp_path, "host1", args, postgres, mlflow_server)
    wait_for(lambda: "waiting for it" in (second[0] / "out.log").read_text(), 240, second[1], every=0.2)
    first[1].send_signal(signal.SIGKILL)
    first[1].wait()
    (out,) = _wait_all([second], 480)
    assert second[1].returncode == 0, out
    took_over = [line for line in out.splitlines() if "takes over" in line]
    assert len(took_over) == 1 and f":{first[1].pid} stopped while training teacher" in took_over[0], out
    print(f"\nthe surviving worker said: {took_over[0]}")

    runs = {r.info.run_id: r for r in _teacher_runs(tracking, epochs)}
    assert runs.pop(run.info.run_id).info.status == "KILLED"
    assert [r.info.status for r in runs.values()] == ["FINISHED"]  # the one trained by the worker that took over
    _check_study(storage, tracking, "takeover")


def test_the_teacher_claim_of_a_frozen_holder_lapses_after_the_grace_period(postgres):
    """A holder stopped (SIGSTOP, a hung host) keeps its connection open but stops beating: the server ends its
    session after the grace period, and the claim goes with it; a beating holder keeps it."""
    from kdsweep.common.locks import WorkLock
    from kdsweep.study.optuna_storage import _with_driver

    url = _with_driver(postgres["url"])
    holder, waiter = WorkLock(url, "teacher:frozen", 0.5, 2), WorkLock(url, "teacher:frozen", 0.5, 2)
    try:
        assert holder.try_acquire()
        time.sleep(3)  # longer than the grace period, beating
        assert not waiter.try_acquire() and not holder.lost
        holder._stop.set()  # frozen: no more beats
        deadline = time.monotonic() + 20
        while not waiter.try_acquire():
            assert time.monotonic() < deadline, "the frozen holder's claim never lapsed"
            time.sleep(0.5)
    finally:
        holder.release()
        waiter.release()
