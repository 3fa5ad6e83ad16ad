"""Files that appear whole or not at all: atomic torch.save, private temporary directories (and the
leftovers of dead processes), and output directories replaced in one rename.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from kdsweep.common.errors import UserError
from kdsweep.common.processes import _pid_alive


def _umask() -> int:
    # /proc/self/status tells without changing it; os.umask() can only be read by setting it (racy with threads).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode an ordinary new file gets under the current umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def atomic_save(obj: Any, path: Path) -> Path:
    """torch.save to a temporary file in the same directory, then rename: a kill never leaves half a file,
    and a concurrent reader sees no file or the whole one. The file honours the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


_TMP = re.compile(r"^(?P<prefix>.*)-(?P<pid>\d+)-[^-]+$")


def make_tmp(prefix: str, parent: Path | None = None) -> Path:
    """A fresh private directory `PREFIX-PID-XXXX` (in the system temp dir unless `parent`)."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=parent))


def sweep_tmp(prefix: str, parent: Path | None = None) -> list[Path]:
    """Remove `PREFIX-PID-*` directories left by processes that are gone (killed before they could clean up)."""
    parent = Path(parent or tempfile.gettempdir())
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TMP.match(p.name)
        if m and m["prefix"] == prefix and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def tmp_dir(prefix: str) -> Iterator[Path]:
    """A private temp directory, removed on any exit Python sees; one left by a killed process goes next time."""
    sweep_tmp(prefix)
    path = make_tmp(prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


MARKER = ".kdsweep-report"


def _replaceable(out: Path, names: Callable[[str], bool]) -> bool:
    """Whether `out` is empty or an earlier report: only then is it replaced as a whole."""
    entries = [p.name for p in out.iterdir()]
    return not entries or MARKER in entries or all(names(n) for n in entries)


def check_out(out: Path, names: Callable[[str], bool] = lambda n: False) -> None:
    """Refuse an --out that is a file, or a directory holding anything but an earlier report (before any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    if out.is_dir() and not _replaceable(out, names):
        raise UserError(f"--out {out} holds files that are not a kdsweep report; it is replaced as a whole, "
                        f"so choose a new or empty directory")


@contextlib.contextmanager
def atomic_dir(out: Path, names: Callable[[str], bool] = lambda n: False) -> Iterator[Path]:
    """Yield a temp directory beside `out`; on success it replaces `out` (old one renamed aside, then deleted).

    A process killed while writing leaves `out` as it was (and a hidden `.OUT.kdsweep-tmp-PID-*`
    beside it, removed by the next call). `names(name)` says which entries an earlier report holds,
    for directories written before the marker file existed; a directory holding anything else is
    refused rather than replaced.
    """
    out = Path(out).resolve()
    check_out(out, names)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {parent} for --out: {e.strerror}") from None
    for kind in ("tmp", "old"):
        sweep_tmp(f".{out.name}.kdsweep-{kind}", parent)
    tmp = make_tmp(f".{out.name}.kdsweep-tmp", parent)
    try:
        (tmp / MARKER).write_text("written by kdsweep report; the directory is replaced as a whole by the next one\n")
        yield tmp
        old = None
        if out.exists():
            old = make_tmp(f".{out.name}.kdsweep-old", parent)
            os.rename(out, old / out.name)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when renamed into place
