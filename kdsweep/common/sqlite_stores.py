"""How kdsweep's SQLite stores commit: a write-ahead log, synced at checkpoints only.

A trial writes dozens of small transactions (its run, its epochs' metrics, Optuna's reports, its end).
In SQLite's default rollback journal every commit syncs the database and its journal to disk: 0.6 ms
on the 2-core VM of docs/performance.md when quiet, 15 ms while other jobs wrote to its disk (more than
an epoch of a small model). In WAL mode with synchronous=NORMAL a commit appends to the log without a
sync: 0.014-0.03 ms there (benchmarks/sqlite_commit.py). A killed process loses
nothing it committed; a power cut or an operating-system crash may roll back the transactions since
the last checkpoint, never leaving a store half-written (docs/reliability.md says what that means for
a study). The journal mode is stored in the database file, so every later reader and writer uses it.
"""

from __future__ import annotations

import sqlite3
import weakref

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

# The log is folded into the database every 100 pages (SQLite's default is 1000: 4 MB of log per store,
# more than the stores themselves early on) and cut back to 512 KB after: a nearly full disk must not be
# filled by the log (the disk-full fault test runs in a 3 MB file system).
PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA wal_autocheckpoint=100",
           "PRAGMA journal_size_limit=524288")


def _on_connect(dbapi_connection, _record) -> None:
    if not isinstance(dbapi_connection, sqlite3.Connection):
        return  # PostgreSQL and other servers decide their own durability
    cursor = dbapi_connection.cursor()
    try:
        for pragma in PRAGMAS:
            cursor.execute(pragma)
    except sqlite3.Error:
        pass  # a read-only store keeps its journal mode: reading it is all that is asked of it
    finally:
        cursor.close()


def use_write_ahead_log() -> None:
    """Every SQLite connection SQLAlchemy opens in this process from now on: WAL, synced at checkpoints."""
    if not event.contains(Engine, "connect", _on_connect):
        event.listen(Engine, "connect", _on_connect)


# Every engine that opened a connection in this process since this module was imported, whoever made it
# (Optuna's storage, MLflow's store, a lock, `kdsweep status` reading a store as it is). kdsweep opens
# stores through study/optuna_storage.py and tracking/tracker.py, which import this module first.
_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


def _remember(connection: Connection) -> None:
    _ENGINES.add(connection.engine)


event.listen(Engine, "engine_connect", _remember)


def close_all() -> None:
    """Close the connections the engines above hold idle, as the interpreter's exit would: the last connection
    to a SQLite store folds its log into the database and removes the -wal and -shm files. For a command that
    ends without the interpreter's own clean-up (cli.release)."""
    for engine in list(_ENGINES):
        engine.dispose()
