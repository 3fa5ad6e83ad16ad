"""A new SQLite MLflow store copied from the cached empty schema (tracking/new_store.py) is the store MLflow makes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from kdsweep.tracking import new_store
from kdsweep.tracking.tracker import Tracker


def _schema(db: Path) -> tuple[list, list]:
    with sqlite3.connect(db) as c:
        tables = sorted(c.execute("select type, name, sql from sqlite_master where name not like 'sqlite_%'"))
        return tables, c.execute("select version_num from alembic_version").fetchall()


def _experiments(tracker: Tracker) -> list[tuple]:
    return [(e.experiment_id, e.name, e.artifact_location) for e in tracker.client.search_experiments()]


def test_a_copied_store_is_the_store_mlflow_makes(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    made = Tracker(f"sqlite:///{tmp_path}/made/mlflow.db")  # no template yet: MLflow's migrations, then the template
    assert made.seeded == "made" and new_store.template_path().exists()
    copied = Tracker(f"sqlite:///{tmp_path}/copied/mlflow.db")
    assert copied.seeded == "copied"
    assert _schema(tmp_path / "made/mlflow.db") == _schema(tmp_path / "copied/mlflow.db")
    # MLflow adds the Default experiment itself, where it would for any new store: not the template's folder
    assert _experiments(copied) == _experiments(made) == [("0", "Default", f"{tmp_path}/mlruns/0")]
    run = copied.start(copied.experiment("e"), "r", {"k": "v"})
    copied.log(run, {"acc": 0.5})
    assert copied.client.get_run(run).data.metrics == {"acc": 0.5}
    assert (tmp_path / "copied/mlflow.db").stat().st_mode & 0o777 == (tmp_path / "made/mlflow.db").stat().st_mode & 0o777


def test_seeding_never_replaces_a_store(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "cache"))
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"the user's")
    assert new_store.seed(db) is None and db.read_bytes() == b"the user's"
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == ["mlflow.db"]  # no copy left behind


def test_a_deleted_stores_log_is_never_replayed_into_a_copy(tmp_path, monkeypatch):
    """A store deleted without its write-ahead log: SQLite would replay the log into a copy put in its place."""
    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    Tracker(f"sqlite:///{tmp_path}/other/mlflow.db")  # the template made
    db = tmp_path / "mlflow.db"
    Path(f"{db}-wal").write_bytes(b"a deleted store's log")
    assert new_store.seed(db) is None and not db.exists()


def test_a_torn_template_is_made_again(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    template = new_store.template_path()
    template.parent.mkdir(parents=True)
    template.write_bytes(b"not a database")
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    assert tracker.seeded == "made" and [e.name for e in tracker.client.search_experiments()] == ["Default"]
    assert _schema(template)[1] == _schema(tmp_path / "mlflow.db")[1] != []


def test_a_cache_it_cannot_write_leaves_the_store_to_mlflow(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file where the cache folder would be")
    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    assert tracker.seeded is None and [e.name for e in tracker.client.search_experiments()] == ["Default"]
