"""A bad day gives one line and exit status 2, loses nothing and leaves nothing RUNNING (issue 9, items 3 and 4).

Each test names the attack that found the problem. The read-only tests run the CLI as a child process:
as root, permission bits do not stop the process, so the child first drops the capabilities that let root
ignore them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER) from its bounding set before exec.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from reliability_helpers import cli_env, free_port

STUDY = ["study", "ce", "--dataset", "digits", "--epochs", "2", "--device", "cpu", "--pruner", "none"]
STUDY_NAME = "ce-digits-digitnet_l-digitnet_s-s0-e2-b32"


def _client(workdir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")


def _runs(workdir: Path) -> list:
    c = _client(workdir)
    return [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id], max_results=10000)]


def _optuna_states(workdir: Path) -> dict[str, int]:
    import optuna

    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{workdir / 'mlruns' / 'optuna.db'}")
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return states


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdsweep: error: "), err[-3000:]
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- disk full


@contextlib.contextmanager
def _full(db: Path):
    """Make SQLite file `db` full for every connection that touches it: SQLite's own SQLITE_FULL ("database or
    disk is full", the error a full disk gives), raised through the real SQLAlchemy/Optuna/MLflow layers.

    `state["full"] = False` lifts the limit again (pooled connections keep theirs until checked out).
    """
    import sqlalchemy
    from sqlalchemy.pool import Pool

    state = {"full": True}

    def on_checkout(dbapi_conn, record, proxy):
        files = [row[2] for row in dbapi_conn.execute("PRAGMA database_list").fetchall()]
        if str(db) in files:
            pages = dbapi_conn.execute("PRAGMA page_count").fetchone()[0]
            dbapi_conn.execute(f"PRAGMA max_page_count = {pages if state['full'] else 1_073_741_823}")

    sqlalchemy.event.listen(Pool, "checkout", on_checkout)
    try:
        yield state
    finally:
        sqlalchemy.event.remove(Pool, "checkout", on_checkout)


@pytest.mark.parametrize("store", ["mlflow", pytest.param("optuna", marks=pytest.mark.slow)])  # one store in the default tier
def test_disk_full_store_is_one_line_exit_2_and_the_study_resumes(kdsweep, workdir, store):
    # Attack: a 3 MB tmpfs under mlruns/ filled up mid-study: exit 1 with a 74-205-line traceback.
    db = workdir / "mlruns" / f"{store}.db"
    db.parent.mkdir(exist_ok=True)
    con = sqlite3.connect(db)  # small pages, made before the store (a WAL store keeps its page size): once full,
    con.execute("PRAGMA page_size = 512")  # the next few inserts need new pages
    con.execute("VACUUM")
    con.close()
    assert kdsweep(*STUDY, "--trials", 2)[0] == 0
    with _full(db) as state:
        code, _, err = kdsweep(*STUDY, "--trials", 6)
        line = _one_error_line(err)
        assert code == 2
        label = {"mlflow": "MLflow", "optuna": "Optuna"}[store]
        assert f"the {label} store {db} is out of disk space (database or disk is full; " in line, line
        assert f"free in {db.parent})" in line and "run the same command again" in line
        state["full"] = False  # space freed
        code, out, err = kdsweep(*STUDY, "--trials", 6)
    assert code == 0, err
    assert _optuna_states(workdir).get("COMPLETE") == 6
    runs = _runs(workdir)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    trial_runs = [r for r in runs if r.data.tags.get("kdsweep.role") == "trial"]
    assert sum(r.info.status == "FINISHED" for r in trial_runs) == 6
    assert [r.info.status for r in runs if r.data.tags.get("kdsweep.role") == "study"] == ["FINISHED"]


# --------------------------------------------------------------------------- corrupt store


def _corrupt_table(db: Path, table: str) -> None:
    """Overwrite the root page of `table` with garbage; the header (page 1) stays valid."""
    con = sqlite3.connect(db, timeout=30)
    # The store is in WAL mode: fold the log into the file first, else the log's newer copy of the page is what
    # SQLite reads and the damage is never seen.
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = con.execute("PRAGMA page_size").fetchone()[0]
    (root,) = con.execute("SELECT rootpage FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    con.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xde\xad" * (page_size // 2))


@pytest.mark.parametrize("store,table", [("optuna", "trials"), ("mlflow", "metrics")])
def test_corrupt_store_is_one_line_exit_2_and_no_run_is_left_running(kdsweep, workdir, store, table):
    # Attack: random bytes written into pages after the (valid) header: exit 1, ~100-line tracebacks,
    # the parent run left RUNNING.
    assert kdsweep(*STUDY, "--trials", 2)[0] == 0
    db = workdir / "mlruns" / f"{store}.db"
    _corrupt_table(db, table)
    code, _, err = kdsweep(*STUDY, "--trials", 4)
    line = _one_error_line(err)
    assert code == 2
    assert f"store {db} is corrupt (database disk image is malformed)" in line, line
    assert f"sqlite3 {db} .recover" in line
    assert not [r for r in _runs(workdir) if r.info.status == "RUNNING"]  # the parent was reopened, then closed


# --------------------------------------------------------------------------- read-only paths


def _drop_root_overrides() -> None:
    """In the child, before exec: root without the capabilities that bypass file permissions."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _run_unprivileged(args: list[str], cwd: Path, tmp: Path, code: str | None = None) -> subprocess.CompletedProcess:
    args = [str(a) for a in args]
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "kdsweep.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=cli_env(tmp), capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, preexec_fn=_drop_root_overrides)


@pytest.fixture
def read_only(tmp_path):
    """chmod a-w on paths, and check that the child processes really are stopped by it."""
    probe = tmp_path / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        r = _run_unprivileged([], tmp_path, tmp_path, code=f"open({str(probe / 'x')!r}, 'w')")
    except OSError as e:
        pytest.skip(f"cannot drop root's permission override here ({e})")
    if r.returncode == 0:
        pytest.skip("a child process here ignores file permissions (root with CAP_DAC_OVERRIDE that cannot be dropped)")
    made = []

    def chmod(*paths: Path) -> None:
        for p in paths:
            for sub in [p, *p.rglob("*")] if p.is_dir() else [p]:
                sub.chmod(sub.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
                made.append(sub)

    yield chmod
    for p in made:
        with contextlib.suppress(OSError):
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


@pytest.mark.slow  # a study, a read-only directory, a resume; permission errors are classified without root tricks below
def test_read_only_artifacts_directory_is_a_permission_problem_and_the_study_resumes(kdsweep, workdir, read_only):
    # Attack: chmod -R a-w mlruns/artifacts, then resume: a 48-line PermissionError traceback.
    assert kdsweep(*STUDY, "--trials", 1)[0] == 0
    read_only(workdir / "mlruns" / "artifacts")
    r = _run_unprivileged([*STUDY, "--trials", 2], workdir, workdir)
    assert r.returncode == 2, r.stderr[-3000:]
    line = _one_error_line(r.stderr)
    assert "permission problem: permission denied: " + str(workdir / "mlruns" / "artifacts") in line, line
    (workdir / "mlruns" / "artifacts").chmod(0o755)
    for p in (workdir / "mlruns" / "artifacts").rglob("*"):
        p.chmod(0o755)
    code, _, err = kdsweep(*STUDY, "--trials", 2)
    assert code == 0, err
    assert _optuna_states(workdir).get("COMPLETE") == 2
    assert not [r for r in _runs(workdir) if r.info.status == "RUNNING"]


def test_read_only_working_directory_with_default_stores_is_one_line(tmp_path, read_only):
    # Attack: `kdsweep study` in a directory the user may not write: a traceback from mkdir.
    cwd = tmp_path / "ro"
    cwd.mkdir()
    read_only(cwd)
    r = _run_unprivileged([*STUDY, "--trials", 1], cwd, tmp_path)
    assert r.returncode == 2
    line = _one_error_line(r.stderr)
    assert f"permission problem: cannot create the store directory {cwd / 'mlruns'} (Permission denied)" in line, line
    assert not (cwd / "mlruns").exists()


@pytest.mark.slow  # a study, then two reports in an unprivileged child process
def test_report_from_a_read_only_store_works_with_no_log(kdsweep, workdir, read_only):
    # Attack: a store another user owns (read-only, no lock file yet): `report --no-log` failed because
    # the lock file beside the database is opened for writing.
    assert kdsweep(*STUDY, "--trials", 1)[0] == 0
    for lock in (workdir / "mlruns").glob("*.kdsweep-lock"):
        lock.unlink()
    read_only(workdir / "mlruns", workdir)
    r = _run_unprivileged(["report", "--no-log", "--no-plots"], workdir, workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "# kdsweep report: digits" in r.stdout and "Traceback" not in r.stderr
    r = _run_unprivileged(["report", "--no-plots"], workdir, workdir)  # logging needs a writable store: say how not to
    assert r.returncode == 2
    line = _one_error_line(r.stderr)
    assert "permission problem" in line and "`--no-log` reports without writing to MLflow" in line, line


def test_permission_and_disk_errors_are_classified_without_root_tricks():
    # The classification itself, for machines where the read-only tests above must skip.
    from kdsweep.common.failures import explain

    assert explain(PermissionError(errno.EACCES, "Permission denied", "/data/x")) == (
        "permission problem: permission denied: /data/x: make it writable for this user, or choose another path")
    assert "read-only file system: /mnt/x" in explain(OSError(errno.EROFS, "Read-only file system", "/mnt/x"))
    assert explain(OSError(errno.ENOSPC, "No space left on device", "/tmp/y")).startswith(
        "out of disk space writing /tmp/y (No space left on device; ")
    assert explain(ValueError("a bug")) is None
    assert explain(KeyError("x")) is None


def test_a_lock_file_that_cannot_be_written_is_opened_read_only_or_skipped(tmp_path, monkeypatch):
    from kdsweep.common import locks

    real_open = os.open

    def refuse_writes(path, flags, *a):
        if flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(locks.os, "open", refuse_writes)
    lock = locks.StudyLock(f"sqlite:///{tmp_path / 'db.sqlite'}", "x")
    with lock:  # no lock file, none may be created: no lock, no error
        pass
    lock.close()
    open(tmp_path / "db.sqlite", "w").close()  # (builtins.open does not go through os.open)
    if os.access(tmp_path / "db.sqlite", os.W_OK):
        lock = locks.StudyLock(f"sqlite:///{tmp_path / 'db.sqlite'}", "x")
        with pytest.raises(PermissionError), lock:  # a store we may write is never used unlocked
            pass
    open(tmp_path / "db.sqlite.kdsweep-lock", "w").close()
    lock = locks.StudyLock(f"sqlite:///{tmp_path / 'db.sqlite'}", "x")
    with lock:  # an existing one: locked through a read-only descriptor
        assert lock._fd is not None and lock._fd >= 0
    lock.close()


# --------------------------------------------------------------------------- splits and study files


def test_empty_and_tiny_splits_are_refused_before_a_teacher_is_trained(kdsweep, workdir, monkeypatch):
    # Attack: --data-size 10 --val-fraction 0.95: ZeroDivisionError; --val-fraction 0.001: a 1-image validation
    # split accepted silently (after 24 s of teacher training for a teacher-based method).
    cache = workdir / "fresh-cache"
    monkeypatch.setenv("KDSWEEP_CACHE", str(cache))
    code, out, err = kdsweep("study", "vanilla_kd", "--dataset", "digits", "--data-size", 10, "--val-fraction", 0.95,
                             "--trials", 1, "--epochs", 1)
    assert code == 2
    assert _one_error_line(err) == (
        "kdsweep: error: the training split holds 0 images (10 minus 10 held out for validation by --val-fraction 0.95): "
        "a full batch of 32 is needed; lower --val-fraction or --batch-size, or raise --data-size")
    code, out, err = kdsweep("study", "vanilla_kd", "--dataset", "digits", "--val-fraction", 0.001, "--trials", 1,
                             "--epochs", 1)
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith("kdsweep: error: the validation split holds 1 image (--val-fraction 0.001 of 1438): "
                           "at least 10 (one per class) are needed, 100 (10 per class) to tune on"), line
    assert "training one now" not in out and not list(cache.rglob("*.pt"))  # no teacher was trained
    for bad in ("0", "1", "1.5", "-0.1"):
        code, _, err = kdsweep("study", "ce", "--dataset", "digits", "--val-fraction", bad)
        assert code == 2 and f"--val-fraction must be in (0, 1), got {float(bad)}" in _one_error_line(err)


def test_a_small_validation_split_is_warned_about(kdsweep):
    code, out, err = kdsweep(*STUDY, "--data-size", 150, "--trials", 1)
    assert code == 0, err
    assert "warning: the validation split holds only 15 images (--val-fraction 0.1 of 150)" in out


@pytest.mark.parametrize("body,message", [
    ('[defaults]\nepochs = "ten"', "[defaults] epochs must be an integer, got 'ten'"),
    ('[defaults]\nbatch_size = "32"', "[defaults] batch_size must be an integer, got '32'"),
    ("[defaults]\nepochs = 2.5", "[defaults] epochs must be an integer, got 2.5"),
    ("[defaults]\nmomentum = true", "[defaults] momentum must be a number, got True"),
    ("[defaults]\ncompile = 1", "[defaults] compile must be true or false, got 1"),
    ("[defaults]\nsampler = 3", "[defaults] sampler must be a string, got 3"),
    ('[fixed]\nlr = "0.1"', "[fixed] lr must be a number, got '0.1'"),
    ('[search]\nlr = {low = "0.01", high = 0.1}', "[search] lr.low must be a number, got '0.01'"),
    ("method = 3", "method must be a string, got 3"),
])
def test_study_file_value_types_are_checked_with_file_and_key_named(kdsweep, workdir, body, message):
    # Attack: `epochs = "ten"` gave a traceback; `batch_size = "32"` was silently accepted.
    (workdir / "studies").mkdir()
    text = body if body.startswith("method") else f'method = "ce"\n{body}\n'
    (workdir / "studies" / "x.toml").write_text(text)
    code, _, err = kdsweep("study", "studies/x.toml", "--dataset", "digits", "--trials", 1, "--epochs", 1)
    assert code == 2
    assert _one_error_line(err) == f"kdsweep: error: study file studies/x.toml: {message}"
    assert not (workdir / "mlruns").exists()  # refused before anything was written


def test_study_file_types_come_from_the_config_dataclass(tmp_path):
    from kdsweep.study.config import _DEFAULT_KEYS, _expected, resolve

    assert all(_expected(k) for k in _DEFAULT_KEYS)  # a new StudyConfig field is checked without a second list
    (tmp_path / "ok.toml").write_text('method = "ce"\n[defaults]\nmomentum = 1\nepochs = 3\ncompile = false\n')
    cfg = resolve(str(tmp_path / "ok.toml"), {"dataset": "digits"})  # an integer is a fine float
    assert (cfg.momentum, cfg.epochs, cfg.compile) == (1, 3, False)


# --------------------------------------------------------------------------- unreachable tracking server


def test_unreachable_tracking_server_fails_within_seconds(kdsweep, monkeypatch):
    # Attack: --tracking-uri http://127.0.0.1:9 (nothing listening): 4 min 8 s of MLflow's retries.
    for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(k, raising=False)
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    code, _, err = kdsweep(*STUDY, "--trials", 1, "--tracking-uri", uri)
    took = time.monotonic() - start
    assert code == 2
    assert _one_error_line(err).startswith(f"kdsweep: error: cannot reach the MLflow tracking server {uri} "
                                           f"(connection refused): is it running?")
    assert took < 15, took
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the probe's settings do not outlive it


# --------------------------------------------------------------------------- nothing left RUNNING or half-written


# A child that runs `kdsweep ARGS` and SIGKILLs itself the first time MODULE:ATTR.PATH is called.
KILL_AT = """
import importlib, os, signal, sys
module, _, path = sys.argv[1].partition(":")
obj = importlib.import_module(module)
*parents, name = path.split(".")
for p in parents:
    obj = getattr(obj, p)
getattr(obj, name)  # a place that no longer exists would never be reached: the kill must not silently miss
setattr(obj, name, lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))
from kdsweep.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _kill_at(where: str, args: list[str], cwd: Path, tmpdir: Path) -> subprocess.CompletedProcess:
    env = cli_env(cwd, TMPDIR=str(tmpdir))
    return subprocess.run([sys.executable, "-c", KILL_AT, where, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def _ours(tmp: Path) -> list[str]:
    """kdsweep's entries in a temp directory (torch may add its own, e.g. torchinductor_USER)."""
    return [p.name for p in tmp.iterdir() if p.name.startswith(("kdsweep-", ".kdsweep-"))]


@pytest.fixture
def private_tmp(workdir, monkeypatch):
    """The system temp directory of this test (and of its child processes)."""
    t = workdir / "systmp"
    t.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(t))
    return t


@pytest.mark.slow  # kill -9 of a report in a child process, then three more reports
def test_a_killed_report_leaves_no_half_written_out_and_no_temp_dirs(kdsweep, workdir, private_tmp, monkeypatch):
    # Attack: kill -9 of `report --out R` while it writes: R looked complete (tables there, plots missing),
    # and the temporary directory of downloaded checkpoints stayed behind.
    assert kdsweep(*STUDY, "--trials", 1)[0] == 0
    r = _kill_at("kdsweep.report.plots:val_curves", ["report", "--out", "R", "--format", "md,csv"], workdir, private_tmp)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not (workdir / "R").exists()  # the tables were written, but beside R, not in it
    assert _ours(private_tmp)  # what SIGKILL leaves: the next report removes it

    code, _, err = kdsweep("report", "--out", "R", "--format", "md,csv", "--no-plots")
    assert code == 0, err
    assert {p.name for p in (workdir / "R").iterdir()} >= {"report.md", "best.csv", "ranks.md"}
    assert not [p for p in workdir.iterdir() if p.name.startswith(".R.kdsweep-")]
    assert not _ours(private_tmp)

    # Replaced as a whole, not merged: a second report with other formats leaves no csv from the first.
    code, _, err = kdsweep("report", "--out", "R", "--format", "json", "--no-plots")
    assert code == 0, err
    assert not list((workdir / "R").glob("*.csv")) and (workdir / "R" / "best.json").is_file()

    # An error half-way through building (after the checkpoints' temp dir was made) removes it too.

    def boom(*a, **k):
        raise RuntimeError("boom")  # a bug, not the environment: a traceback, but no temp dir left

    from kdsweep.report import build

    monkeypatch.setattr(build, "predict", boom)
    with pytest.raises(RuntimeError):
        kdsweep("report", "--out", "R", "--no-plots")
    assert not _ours(private_tmp)
    assert (workdir / "R" / "best.json").is_file()  # the previous report is untouched


def test_report_out_refuses_a_directory_that_is_not_a_report(kdsweep, workdir):
    assert kdsweep(*STUDY, "--trials", 1)[0] == 0
    (workdir / "mine").mkdir()
    (workdir / "mine" / "thesis.tex").write_text("precious")
    code, _, err = kdsweep("report", "--out", "mine", "--no-plots")
    assert code == 2 and "holds files kdsweep did not write (thesis.tex)" in _one_error_line(err)
    assert (workdir / "mine" / "thesis.tex").read_text() == "precious"


def test_report_out_never_deletes_the_users_plots_or_report(kdsweep, workdir):
    """Attack: `report --out paper` where paper/ holds the user's plots/ and report.md: both were deleted, exit 0,
    because any top-level plots/ or report.md was taken for an earlier report's."""
    assert kdsweep(*STUDY, "--trials", 1)[0] == 0
    paper = workdir / "paper"
    (paper / "plots" / "raw").mkdir(parents=True)
    mine = {"plots/fig_final.pdf": "figure", "plots/raw/run1.csv": "a,b", "report.md": "my notes"}
    for rel, text in mine.items():
        (paper / rel).write_text(text)
    code, _, err = kdsweep("report", "--out", "paper", "--format", "md,csv")
    assert code == 2 and "kdsweep did not write" in _one_error_line(err) and "--overwrite" in err
    assert {rel: (paper / rel).read_text() for rel in mine} == mine

    # Asked to: the report's files go in among the user's; a same-named file is replaced, nothing else is removed.
    code, _, err = kdsweep("report", "--out", "paper", "--format", "md,csv", "--overwrite")
    assert code == 0, err
    assert (paper / "plots" / "fig_final.pdf").read_text() == "figure" and (paper / "plots/raw/run1.csv").is_file()
    assert (paper / "best.csv").is_file() and (paper / "plots" / "test_acc.png").is_file()
    assert (paper / "report.md").read_text() != "my notes"  # the one name the user asked to overwrite
    # Still not a directory kdsweep may replace as a whole: the user's files are there.
    code, _, err = kdsweep("report", "--out", "paper", "--format", "json", "--no-plots")
    assert code == 2 and "plots/fig_final.pdf" in err

    # A report directory kdsweep wrote is replaced as a whole, but not once the user put a file of their own in it.
    assert kdsweep("report", "--out", "R", "--format", "csv", "--no-plots")[0] == 0
    assert kdsweep("report", "--out", "R", "--format", "json", "--no-plots")[0] == 0
    assert not list((workdir / "R").glob("*.csv"))
    (workdir / "R" / "notes.txt").write_text("mine")
    assert kdsweep("report", "--out", "R", "--format", "md", "--no-plots")[0] == 2
    assert (workdir / "R" / "notes.txt").read_text() == "mine" and (workdir / "R" / "best.json").is_file()


def _dead_owner() -> dict:
    from kdsweep.common.processes import Owner

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    me = Owner.me()
    return Owner(me.node, me.host, proc.pid, "1").as_attr()  # its start time cannot match: gone


@pytest.mark.slow  # kill -9 of confirm and report in child processes; closing dead owners' runs stays in the default tier
def test_killed_confirm_and_report_runs_are_closed_by_the_next_one(kdsweep, workdir, private_tmp):
    # Attack: kill -9 of `kdsweep confirm` mid-seed and of `kdsweep report` while it logs: their MLflow runs
    # stayed RUNNING forever (only trial runs were reconciled); confirm's checkpoint temp dir stayed behind.
    assert kdsweep(*STUDY, "--trials", 1)[0] == 0
    r = _kill_at("kdsweep.report.confirm:train_students", ["confirm", "--seeds", "1"], workdir, private_tmp)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    running = {r.data.tags.get("kdsweep.role"): r for r in _runs(workdir) if r.info.status == "RUNNING"}
    assert set(running) == {"confirm"}  # what the kill left
    r = _kill_at("mlflow.tracking:MlflowClient.log_artifact", ["report", "--no-plots"], workdir, private_tmp)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    # The report closed the lost seed's run (and named it) before it was killed in turn.
    assert "confirmation seed" in r.stdout and "was lost" in r.stdout
    running.update({r.data.tags.get("kdsweep.role"): r for r in _runs(workdir) if r.info.status == "RUNNING"})
    assert {k for k, r in running.items() if {x.info.run_id: x for x in _runs(workdir)}[r.info.run_id].info.status
            == "RUNNING"} == {"report"}

    # A run whose owner lives on (this process), and one from before owners were recorded: left alone.
    from kdsweep.tracking.cleanup import owner_tags
    from kdsweep.tracking.tracker import Tracker

    t = Tracker(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    exp = running["confirm"].info.experiment_id
    alive = t.start(exp, "alive", {"kdsweep.role": "confirm", **owner_tags()})
    legacy = t.start(exp, "legacy", {"kdsweep.role": "report"})

    code, out, err = kdsweep("confirm", "--seeds", "1")
    assert code == 0, err
    code, out, err = kdsweep("report", "--no-plots")
    assert code == 0, err
    assert f"closed report run {running['report'].info.run_id}" in err

    by_id = {r.info.run_id: r for r in _runs(workdir)}
    for killed in running.values():
        closed = by_id[killed.info.run_id]
        assert closed.info.status == "KILLED"
        assert closed.data.tags["kdsweep.reason"].endswith("is gone (killed or crashed)")
        assert json.loads(closed.data.tags["kdsweep.owner"])["pid"] != os.getpid()
    assert by_id[alive].info.status == "RUNNING" and by_id[legacy].info.status == "RUNNING"
    done = [r for r in by_id.values() if r.data.tags.get("kdsweep.role") == "confirm" and r.info.status == "FINISHED"]
    assert len(done) == 1  # the killed seed was trained again
    assert not _ours(private_tmp)  # the killed confirm's and report's temp dirs are gone


def test_confirm_closes_runs_of_dead_owners_only(workdir):
    from kdsweep.tracking.cleanup import close_dead_runs
    from kdsweep.tracking.tracker import Tracker
    from kdsweep.tracking.vocabulary import OWNER_TAG

    t = Tracker(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = t.experiment("e")
    dead = t.start(exp, "dead", {"kdsweep.role": "report", OWNER_TAG: json.dumps(_dead_owner())})
    said: list[str] = []
    assert close_dead_runs(t, exp, ("report",), said.append) == 1
    run = t.client.get_run(dead)
    assert run.info.status == "KILLED" and run.data.tags["kdsweep.state"] == "FAIL" and said


def test_a_report_of_a_study_still_running_says_so(kdsweep, workdir):
    """Attack: `report` while workers still wrote logged a report run that looked final (1 of 6 trials complete)."""
    from mlflow.tracking import MlflowClient

    assert kdsweep(*STUDY, "--trials", 1)[0] == 0
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    exp = [e for e in client.search_experiments() if e.name.startswith("kdsweep/")][0]
    parent = client.search_runs([exp.experiment_id], "tags.`kdsweep.role` = 'study'")[0]
    # A trial that a worker is training now, as MLflow shows it: RUNNING under the study's parent run.
    client.create_run(exp.experiment_id, run_name="t001", tags={
        "kdsweep.role": "trial", "kdsweep.study": parent.data.tags["kdsweep.study"], "kdsweep.state": "RUNNING",
        "mlflow.parentRunId": parent.info.run_id})
    code, out, err = kdsweep("report", "--no-plots")
    assert code == 0, err
    assert "in progress: ce still running when this report was made" in out
    (report,) = client.search_runs([exp.experiment_id], "tags.`kdsweep.role` = 'report'")
    assert report.data.tags["kdsweep.in_progress"] == "true" and report.info.run_name == "report-s0-in-progress"


def _confirm_run(workdir, seed: int, owner: dict) -> str:
    """A RUNNING confirmation run of the study's best trial, as a confirm process leaves it while it trains."""
    from kdsweep.tracking.tracker import Tracker

    runs = _runs(workdir)
    parent = next(r for r in runs if r.data.tags.get("kdsweep.role") == "study")
    best = max((r for r in runs if r.data.tags.get("kdsweep.role") == "trial" and "best_val_acc" in r.data.metrics),
               key=lambda r: r.data.metrics["best_val_acc"])
    t = Tracker(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    return t.start(parent.info.experiment_id, f"confirm-s{seed}", {
        "kdsweep.role": "confirm", "kdsweep.study": parent.data.tags["kdsweep.study"], "kdsweep.method": "ce",
        "kdsweep.confirm_seed": seed, "kdsweep.source_run": best.info.run_id, "kdsweep.state": "RUNNING",
        "kdsweep.owner": json.dumps(owner)}, parent=parent.info.run_id)


def test_two_confirms_share_the_seeds(kdsweep, workdir):
    """Attack: two `confirm --seeds 4` at once both trained seeds 3 and 4. A seed another live confirm is training
    is now left to it (the claim is made under a lock, as a trial's is)."""
    from kdsweep.common.processes import Owner
    from kdsweep.report.stored_studies import confirm_seeds

    assert kdsweep(*STUDY, "--trials", 1)[0] == 0
    seeds = confirm_seeds(0, 2)
    other = _confirm_run(workdir, seeds[1], Owner.me().as_attr())  # alive: this very process
    code, out, err = kdsweep("confirm", "--seeds", "2")
    assert code == 0, err
    assert f"seed {seeds[1]}: being trained by " in err and f"(run {other}); left to it" in err
    confirms = [r for r in _runs(workdir) if r.data.tags.get("kdsweep.role") == "confirm"]
    assert sorted(r.data.tags["kdsweep.confirm_seed"] for r in confirms) == sorted(map(str, seeds))  # none twice


def test_a_report_names_a_lost_confirmation_seed_and_closes_its_run(kdsweep, workdir):
    """Attack: SIGKILL of a confirm seed left its run RUNNING, and the report showed n = 4 of 5 without a word."""
    assert kdsweep(*STUDY, "--trials", 1)[0] == 0
    lost = _confirm_run(workdir, 5, _dead_owner())
    code, out, err = kdsweep("report", "--no-plots", "--no-log")
    assert code == 0 and "ce: confirmation seed 5 was lost (its process" in out and "run `kdsweep confirm` again" in out
    assert {r.info.run_id: r.info.status for r in _runs(workdir)}[lost] == "RUNNING"  # --no-log writes nothing
    code, out, err = kdsweep("report", "--no-plots")
    assert code == 0 and "confirmation seed 5 was lost" in out
    closed = {r.info.run_id: r for r in _runs(workdir)}[lost]
    assert closed.info.status == "KILLED" and closed.data.tags["kdsweep.reason"].endswith("is gone (killed or crashed)")
