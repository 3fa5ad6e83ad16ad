"""Attacks on secrets: passwords that a URL parser reads wrongly, and store URIs on a command line.

A PostgreSQL password may hold '#', '?', '/' or '@' unescaped: SQLAlchemy (and so the driver) reads it whole,
while a generic URL parser stops at those characters and leaves the rest of the password in plain sight.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from urllib.parse import quote

import pytest
from reliability_helpers import free_port

from kdsweep.common.uris import redact, scrub, secrets_of

TRICKY = [
    ("postgresql://kd2:s3c#ret@127.0.0.1/db", "s3c#ret"),
    ("postgresql+psycopg2://kd:wh?at/ever@h:5432/db?sslmode=require", "wh?at/ever"),
    ("postgresql://kd:pa@ss#w0rd@h/db", "pa@ss#w0rd"),
    ("mysql+pymysql://u:sl/ash@h/d", "sl/ash"),
    ("postgresql://kd:s3cr%23t@h/db", "s3cr#t"),
    ("postgresql://kd@h/db?sslmode=require&password=qu%23ery", "qu#ery"),
    ("http://kd:htt%2Fp-pw@127.0.0.1:5000", "htt/p-pw"),
    ("https://mlflow.example/api?token=t0k#frag", "t0k"),
]


@pytest.mark.parametrize("uri,password", TRICKY)
def test_a_password_holding_hash_question_slash_or_at_is_redacted(uri, password):
    shown = redact(uri)
    assert "***" in shown
    for secret in {password, quote(password, safe="")}:  # as written, and as a driver may echo it encoded
        assert secret not in shown
        assert scrub(f"FATAL: password authentication failed ({secret})", uri) == \
            "FATAL: password authentication failed (***)"
    assert password in secrets_of(uri)


def test_what_is_not_a_secret_stays_readable():
    assert redact("postgresql://kd2:s3c#ret@db.example:5432/optuna") == "postgresql://kd2:***@db.example:5432/optuna"
    assert redact("https://mlflow.example/api?email=a@b&x=1") == "https://mlflow.example/api?email=a@b&x=1"
    assert redact("sqlite:////srv/mlruns/optuna.db") == "sqlite:////srv/mlruns/optuna.db"
    assert secrets_of("postgresql://kd:a@b@h/db") == ["a%40b", "a@b"]  # not SQLAlchemy's 'a', which blanks every 'a'


@pytest.mark.parametrize("flag", ["--storage", "--tracking-uri"])
def test_a_hash_password_on_an_unreachable_server_is_never_printed(flag, tmp_path, monkeypatch, capsys):
    from kdsweep import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"postgresql://kd2:wr#ong/pw@127.0.0.1:{free_port()}/db"  # nothing listens there
    for argv in (["status", flag, uri], ["study", "ce", "--dataset", "digits", "--trials", "1", flag, uri]):
        code = cli.main(argv)
        out, err = capsys.readouterr()
        assert code == 2 and len(err.strip().splitlines()) == 1, (argv, err)
        assert "wr#ong" not in out + err and "ong/pw" not in out + err, (argv, err)


def test_ui_names_the_store_only_in_the_servers_environment():
    from kdsweep.tools import ui

    uri = "postgresql+psycopg2://kd:s3cretPW@127.0.0.1:5432/kd"
    assert not any("s3cretPW" in part or "postgresql" in part for part in ui.server_command("127.0.0.1", 5000))
    assert ui.server_env(uri)["MLFLOW_BACKEND_STORE_URI"] == uri


@pytest.mark.slow
def test_ui_puts_no_store_uri_on_any_command_line(tmp_path):
    """The real server: while it answers, no process on the machine shows the store's path in its arguments."""
    from kdsweep.tools import ui

    store = tmp_path / "store-marker-7f3a"
    store.mkdir()
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{store}/mlflow.db").search_experiments()  # an existing store, as `kdsweep ui` requires
    port = free_port()
    # The store reaches the child through its environment, so the child's own `python -c` line does not name it.
    script = "import os; from kdsweep.tools import ui; ui.serve(os.environ['STORE'], '127.0.0.1', int(os.environ['PORT']))"
    env = {**os.environ, "STORE": f"sqlite:///{store}/mlflow.db", "PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not ui.answers("127.0.0.1", port):
            assert proc.poll() is None and time.monotonic() < deadline, "the MLflow UI did not start"
            time.sleep(0.5)
        lines = subprocess.run(["ps", "-eo", "args", "--no-headers"], capture_output=True, text=True).stdout
        assert "store-marker-7f3a" not in lines
    finally:
        proc.terminate()
        proc.wait(60)
