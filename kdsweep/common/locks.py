"""The study lock: mutual exclusion between the workers of one study (flock beside a SQLite store, an
advisory lock on PostgreSQL).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
from pathlib import Path


def _open_lock_file(path: Path, db: Path) -> int:
    """A descriptor to flock `path` through; -1 (no lock) where it cannot be had and store `db` is read-only.

    flock works on a read-only descriptor too, so a lock file someone else created still locks. Without
    one, a store this process cannot write can still be read (`kdsweep report --no-log`), and there is
    nothing to serialise. A store it can write is never used unlocked: the permission error stands.
    """
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        if not isinstance(e, PermissionError) and e.errno != errno.EROFS:
            raise
        refused = e
    try:
        return os.open(path, os.O_RDONLY)
    except (FileNotFoundError, PermissionError):
        if db.exists() and os.access(db, os.W_OK) and os.access(db.parent, os.W_OK):
            raise refused from None
        return -1


def _lock_key(name: str) -> int:
    """A signed 64-bit key for PostgreSQL's advisory locks."""
    return int.from_bytes(hashlib.blake2b(f"kdsweep:{name}".encode(), digest_size=8).digest(), "big", signed=True)


class StudyLock:
    """Mutual exclusion between the workers of one study, for the few milliseconds of a claim.

    * SQLite file: an flock on `<db>.kdsweep-lock` beside it (workers share one host).
    * PostgreSQL: a transaction-scoped advisory lock on its own connection; if
      a worker dies holding it, the server drops the connection and the lock,
      and a worker that hangs loses it after idle_in_transaction_session_timeout.
    * anything else: no lock (`exact` is False); claims can then race.
    """

    IDLE_TIMEOUT_MS = 120_000

    def __init__(self, url: str, name: str):
        self.name = name
        self.exact = True
        self._fd: int | None = None
        self._path: Path | None = None
        self._engine = None
        self._conn = None
        self._mutex = threading.Lock()
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            self._db = Path(url[len("sqlite:///"):].split("?", 1)[0])
            self._path = self._db.with_name(self._db.name + ".kdsweep-lock")
        elif url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres"):
            import sqlalchemy
            from sqlalchemy.pool import NullPool

            self._engine = sqlalchemy.create_engine(url, poolclass=NullPool)
        elif not url.startswith("sqlite"):
            self.exact = False

    def __enter__(self) -> "StudyLock":
        self._mutex.acquire()
        try:
            if self._path is not None:
                import fcntl

                if self._fd is None:
                    self._fd = _open_lock_file(self._path, self._db)
                if self._fd >= 0:
                    fcntl.flock(self._fd, fcntl.LOCK_EX)
            elif self._engine is not None:
                from sqlalchemy import text

                self._conn = self._engine.connect()
                self._conn.execute(text(f"SET idle_in_transaction_session_timeout = {self.IDLE_TIMEOUT_MS}"))
                self._conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(self.name)})
        except BaseException:
            self._drop_connection()
            self._mutex.release()
            raise
        return self

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()  # rolls back: the advisory lock goes with the transaction
            self._conn = None

    def __exit__(self, *exc) -> None:
        try:
            if self._fd is not None and self._fd >= 0:
                import fcntl

                fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._drop_connection()
        finally:
            self._mutex.release()

    def close(self) -> None:
        if self._fd is not None:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = None
        if self._engine is not None:
            self._engine.dispose()
