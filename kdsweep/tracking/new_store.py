"""A new SQLite MLflow store, copied from an empty one made once per MLflow version.

MLflow makes a new store's tables by running its ~50 schema migrations: 0.9 s on the 2-core VM of
docs/performance.md, paid by every new study folder before its first trial (issue 20, start-up). The
migrations give the same empty schema every time, so kdsweep makes it once, in its cache folder, and
copies it (0.06 s once MLflow's SQL store is imported). The copy holds only the tables and their schema revision: MLflow adds the
"Default" experiment, whose artifact folder depends on where the store is, when it opens the copy,
and checks the revision against its own as it does for any store. Anything that goes wrong here leaves
the new store to MLflow, as before.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

from kdsweep.common.atomic import file_mode
from kdsweep.common.cache import cache_dir


def template_path() -> Path:
    """Where the empty store of the installed MLflow is kept."""
    import mlflow

    return cache_dir() / "mlflow-schema" / f"mlflow-{mlflow.__version__}.db"


def _make_template(path: Path) -> None:
    """Run MLflow's migrations on an empty file, and put it at `path` whole (workers may race to make it)."""
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        made = Path(tmp) / "store.db"
        engine = sqlalchemy.create_engine(f"sqlite:///{made}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
        # One self-contained file: kdsweep's connections open it in WAL mode (sqlite_stores.py), which is stored
        # in the file and would leave a log beside it; a copy must not depend on one.
        with contextlib.closing(sqlite3.connect(made)) as db:
            db.execute("PRAGMA journal_mode=DELETE")
        os.replace(made, path)


def _whole(template: Path) -> bool:
    """The template is there and is an SQLite database with one schema revision (not a torn or foreign file)."""
    if not template.exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"{template.as_uri()}?mode=ro", uri=True)) as db:
            return (db.execute("PRAGMA quick_check").fetchall() == [("ok",)]
                    and len(db.execute("SELECT version_num FROM alembic_version").fetchall()) == 1)
    except sqlite3.Error:
        return False


def seed(db: Path) -> str | None:
    """Put an empty MLflow store at `db`, which must not exist yet (the caller holds the store's init lock):
    "copied" from the template, or "made" (the template made first, by MLflow's migrations); None if it could
    not, and MLflow makes the tables itself."""
    try:
        if db.exists():  # another worker made it before this one took the lock
            return None
        if any(Path(f"{db}{end}").exists() for end in ("-wal", "-shm", "-journal")):
            return None  # a deleted store's log: SQLite would replay it into the copy; left to MLflow, as before
        template, how = template_path(), "copied"
        if not _whole(template):
            _make_template(template)
            how = "made"
        fd, tmp = tempfile.mkstemp(prefix=f".{db.name}.", dir=db.parent)
        os.close(fd)
        try:
            shutil.copyfile(template, tmp)
            os.chmod(tmp, file_mode())  # as a store MLflow made: mkstemp's file is private to its owner
            os.link(tmp, db)  # whole, and never over a store that appeared meanwhile
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return how
    except Exception:  # noqa: BLE001 - a cache folder we may not write, a private MLflow function gone: MLflow migrates
        return None
