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


def is_postgres(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


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
        elif is_postgres(url):
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


class WorkLock:
    """A PostgreSQL advisory lock held across hosts for long work (training a teacher: minutes to hours).

    Transaction-scoped on a connection of its own, so the lock dies with its holder: a killed process's
    connection is closed by its kernel at once, and a frozen or unplugged one stops beating and is ended by
    the server after `grace` seconds (idle_in_transaction_session_timeout). A thread beats while it is held.
    """

    def __init__(self, url: str, name: str, interval: float, grace: float):
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        self.key, self.interval, self.grace = _lock_key(name), interval, grace
        self._engine = sqlalchemy.create_engine(url, poolclass=NullPool)
        self._conn = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False  # the server ended the session under us (a beat failed)

    def try_acquire(self) -> bool:
        """Take the lock if it is free; never waits."""
        from sqlalchemy import text

        if self._conn is None:
            self._conn = self._engine.connect()
            self._conn.execute(text(f"SET idle_in_transaction_session_timeout = {int(self.grace * 1000)}"))
            self._conn.commit()
        got = self._conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": self.key}).scalar()
        if not got:
            self._conn.rollback()  # not idle in a transaction between tries
            return False
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="kdsweep-work-lock-beat", daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        from sqlalchemy import text

        while not self._stop.wait(self.interval):
            try:
                self._conn.execute(text("SELECT 1"))  # resets the server's idle-in-transaction timer
            except Exception:  # noqa: BLE001 - the session is gone, and the lock with it
                self.lost = True
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()  # rolls back: the lock goes with the transaction
            self._conn = None
        self._engine.dispose()
