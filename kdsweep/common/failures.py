"""Failures of the environment, told in one line: a full disk, a corrupt or read-only store, a permission.

They are not kdsweep's bugs and not the user's typos, but the user can fix
them (free space, restore a backup, fix permissions), so the CLI prints them
like a UserError - one line, exit status 2 - instead of the 100-line chain
that SQLAlchemy, Optuna and MLflow build around one SQLite message.

`explain(exc)` looks through the exception's causes for the root error and
says which store it hit. The stores are the ones this process opened
(`register` is called by `study.open_storage` and `tracking.Tracker`); which
one failed is read off the traceback (the innermost Optuna or MLflow frame).
"""

from __future__ import annotations

import errno
import shutil
import sqlite3
from pathlib import Path

_STORES: dict[str, str] = {}  # "Optuna" / "MLflow" -> the URL this process opened

DISK_FULL = ("database or disk is full", "no space left on device", "disk quota exceeded")
CORRUPT = ("database disk image is malformed", "file is not a database", "malformed database schema")
READ_ONLY = ("attempt to write a readonly database", "readonly database", "unable to open database file")


def register(label: str, url: str) -> None:
    """Remember a store this process opened, so a failure in it can be named."""
    _STORES[label] = url


def forget() -> None:
    _STORES.clear()


def causes(exc: BaseException) -> list[BaseException]:
    """The exception and everything it was raised from or during, outermost first."""
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _modules(exc: BaseException) -> list[str]:
    """Module names along the exception's traceback, innermost frame first."""
    names, tb = [], exc.__traceback__
    while tb is not None:
        names.append(str(tb.tb_frame.f_globals.get("__name__", "")))
        tb = tb.tb_next
    return names[::-1]


def store_of(exc: BaseException) -> str | None:
    """'Optuna' or 'MLflow': whose code the failure came through (innermost frame wins)."""
    for e in causes(exc):
        for name in _modules(e):
            if name.startswith("optuna."):
                return "Optuna"
            if name.startswith("mlflow."):
                return "MLflow"
    return None


def _sqlite_path(url: str) -> Path | None:
    prefix = "sqlite:///"
    if url.startswith(prefix) and url != "sqlite:///:memory:":
        return Path(url[len(prefix):].split("?", 1)[0])
    return None


def _size(n: float) -> str:
    unit = "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}"


def free_space(path: Path) -> str:
    """'12 KiB free in DIR' for the nearest existing directory of `path` ('' if unknown)."""
    d = path if path.is_dir() else path.parent
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        return f"{_size(shutil.disk_usage(d).free)} free in {d}"
    except OSError:
        return ""


def _store(exc: BaseException) -> tuple[str, Path | None, str]:
    """(how to name the store that failed, its SQLite file or None, the flag that chooses it)."""
    from kdsweep.common.uris import redact

    label = store_of(exc)
    if label is None and len(_STORES) == 1:
        label = next(iter(_STORES))
    url = _STORES.get(label or "")
    flag = {"Optuna": "--storage", "MLflow": "--tracking-uri"}.get(label or "", "--storage/--tracking-uri")
    if label is None:
        return "a kdsweep store" + (f" ({', '.join(redact(u) for u in _STORES.values())})" if _STORES else ""), None, flag
    path = _sqlite_path(url) if url else None
    where = str(path) if path else redact(url) if url else ""
    return f"the {label} store {where}".rstrip(), path, flag


def first_line(e: BaseException) -> str:
    """An exception's first line, at most 200 characters (its type's name when it says nothing): for one-line errors."""
    text = str(e.args[0] if isinstance(e, sqlite3.Error) and e.args else e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def explain(exc: BaseException) -> str | None:
    """One line for a failure of the disk, a store or a permission; None for anything else (a bug: keep the traceback)."""
    from kdsweep.common.uris import scrub

    msg = _explain(exc)
    return scrub(msg, *_STORES.values()) if msg else None


def _explain(exc: BaseException) -> str | None:
    for e in causes(exc):
        low = first_line(e).lower()
        is_sqlite = isinstance(e, sqlite3.Error)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = Path(e.filename) if e.filename else None
            free = free_space(where) if where else ""
            return (f"out of disk space writing {where or 'a file'} ({e.strerror}{'; ' + free if free else ''}): "
                    f"free some space, then run the same command again (nothing written so far is lost)")
        if (is_sqlite or type(e).__module__.startswith("psycopg")) and any(m in low for m in DISK_FULL):
            name, path, _ = _store(exc)
            free = free_space(path) if path else ""
            return (f"{name} is out of disk space ({first_line(e)}{'; ' + free if free else ''}): free some space, "
                    f"then run the same command again (nothing written so far is lost)")
        if is_sqlite and any(m in low for m in CORRUPT):
            name, path, flag = _store(exc)
            salvage = f", salvage it with `sqlite3 {path} .recover`" if path else ""
            return f"{name} is corrupt ({first_line(e)}): restore a backup{salvage}, or use another {flag}"
        if is_sqlite and any(m in low for m in READ_ONLY):
            name, path, _ = _store(exc)
            return (f"permission problem: {name} cannot be written ({first_line(e)}): make the file and its directory "
                    f"writable for this user" + (f" ({path.parent})" if path else ""))
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            what = e.filename or "a file"
            why = "read-only file system" if e.errno == errno.EROFS else "permission denied"
            return f"permission problem: {why}: {what}: make it writable for this user, or choose another path"
    return None
