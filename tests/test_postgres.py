"""Several workers, one study, on a real PostgreSQL server and a real `mlflow server` (both on loopback).

The PostgreSQL server is this machine's (Debian's `postgresql` package,
installed with apt-get when missing and we are root), run from a temporary
data directory with initdb/pg_ctl as the `postgres` user, on a free port of
127.0.0.1, with password authentication; it is stopped and deleted after the
module. The test skips, saying why, only where PostgreSQL cannot be had.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
from reliability_helpers import (
    cli_env,
    free_port,
    load_trials,
    mlflow_runs,
    start_cli,
    stop,
)

PASSWORD = "kd-S3cret-pw"  # distinctive: the test greps every output and store for it
TRIALS = 6
WORKERS = 3


def _skip(reason: str):
    print(f"\nPostgreSQL test skipped: {reason}")
    pytest.skip(reason)


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3].split(".")[0]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).resolve().parent if which else None


def _install_postgres() -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        _skip("PostgreSQL is not installed and this is not a root Debian/Ubuntu machine to apt-get it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]
    if subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            _skip(f"apt-get install postgresql failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the `postgres` user then."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *cmd]
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{c}'" for c in cmd)]


@pytest.fixture(scope="module")
def postgres():
    pytest.importorskip("psycopg2", reason="psycopg2 is missing: pip install -e '.[test]' (it has psycopg2-binary)")
    bindir = _pg_bin()
    if bindir is None:
        _install_postgres()
        bindir = _pg_bin()
        if bindir is None:
            _skip("apt-get installed postgresql but no initdb was found under /usr/lib/postgresql")
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            _skip("running as root and there is no `postgres` user to run the server as")
    root = Path(tempfile.mkdtemp(prefix="kdsweep-pg-"))
    data, pwfile, log = root / "data", root / "pw", root / "server.log"
    pwfile.write_text(PASSWORD + "\n")
    if os.geteuid() == 0:
        os.chown(root, user.pw_uid, user.pw_gid)
        os.chown(pwfile, user.pw_uid, user.pw_gid)
    port = free_port()
    try:
        init = subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "kd", "-E", "UTF8",
                                            "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]),
                              capture_output=True, text=True, timeout=300)
        assert init.returncode == 0, init.stdout + init.stderr
        start = subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "120",
                                             "-o", f"-h 127.0.0.1 -p {port} -k {root}", "start"]),
                               capture_output=True, text=True, timeout=300)
        assert start.returncode == 0, start.stdout + start.stderr + (log.read_text() if log.exists() else "")
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=port, user="kd", password=PASSWORD, dbname="postgres")
        con.autocommit = True
        con.cursor().execute("CREATE DATABASE optuna")
        con.close()
        yield {"url": f"postgresql://kd:{PASSWORD}@127.0.0.1:{port}/optuna", "port": port}
    finally:
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


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
    procs = []
    for i in range(WORKERS):  # each in its own directory, as on its own machine
        home = tmp_path / f"worker{i}"
        home.mkdir()
        procs.append((home, start_cli(args, home, cli_env(tmp_path), log=home / "out.log")))
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
    for out in outputs:
        assert PASSWORD not in out
    assert PASSWORD.encode() not in mlflow_server["db"].read_bytes()
    for r in runs + parents:
        assert PASSWORD not in repr(r.data.params) + repr(r.data.tags)
    import psycopg2

    con = psycopg2.connect(host="127.0.0.1", port=postgres["port"], user="kd", password=PASSWORD, dbname="optuna")
    try:
        cur = con.cursor()
        for table in ("study_user_attributes", "study_system_attributes", "trial_user_attributes", "trial_system_attributes"):
            cur.execute(f"SELECT count(*) FROM {table} WHERE value_json LIKE %s", (f"%{PASSWORD}%",))
            assert cur.fetchone()[0] == 0, table
    finally:
        con.close()
