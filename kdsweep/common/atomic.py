"""Files that appear whole or not at all: atomic torch.save, private temporary directories (and the
leftovers of dead processes), and output directories replaced in one rename.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
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


def path_component(name: str) -> str:
    """`name` as one file name that stays inside its folder: kept as it is when it already is one, else with
    '/', '\\' and NUL replaced, leading dots dropped, and a hash of the original added, so two names stay two."""
    if name and "/" not in name and "\\" not in name and "\0" not in name and not name.startswith("."):
        return name
    clean = re.sub(r"[/\\\0]+", "_", name).lstrip(".") or "_"
    stem, dot, suffix = clean.rpartition(".")
    if not (dot and stem and suffix.isalnum()):
        stem, suffix = clean, ""
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{stem}-{digest}" + (f".{suffix}" if suffix else "")


def _sweep_dead_tmp_files(path: Path) -> None:
    """Remove the temporary files that processes now gone left beside `path` (killed mid-write)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _atomic_write(path: Path, write: Callable[[Any], None]) -> Path:
    """Write `path` through `write(binary file)` into a temporary file in the same directory, then rename: a kill
    never leaves half a file, and a concurrent reader sees no file or the whole one. The file honours the umask.

    The temporary file is created exclusively at an unpredictable name (mkstemp: O_EXCL, so a link planted
    there is never written through); its name holds the pid, so the next write removes what a killed one left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead_tmp_files(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj: Any, path: Path) -> Path:
    """torch.save, whole or not at all (`_atomic_write`)."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: Path) -> Path:
    """A UTF-8 text file, whole or not at all (`_atomic_write`)."""
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


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
_MARKER_HEAD = "written by kdsweep report; the next report may replace the files listed here, and no other\n"


def _files(root: Path) -> list[str]:
    """Every entry under `root` that is not a directory (links too, never followed), as relative paths."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            out.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(out)


def _listed(out: Path, legacy: Callable[[str], bool]) -> set[str] | None:
    """The files a report's marker lists as kdsweep's; None without a marker. A marker from before the list
    was kept vouches only for the file names a report writes (`legacy`), never for anything else there."""
    try:
        lines = (out / MARKER).read_text().splitlines()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"cannot read {out / MARKER}: {e.strerror}") from None
    listed = {line for line in lines[1:] if line.strip()}
    return (listed or {f for f in _files(out) if legacy(f)}) | {MARKER}


def foreign_files(out: Path, legacy: Callable[[str], bool] = lambda f: False) -> list[str]:
    """The files under directory `out` that kdsweep did not write there (all of them when it holds no marker)."""
    files = _files(out)
    listed = _listed(out, legacy) if files else set()
    return [f for f in files if listed is None or f not in listed]


def check_out(out: Path, legacy: Callable[[str], bool] = lambda f: False, overwrite: bool = False) -> None:
    """Refuse, before any work, an --out that is a file, or a directory holding files kdsweep did not write there
    (unless `overwrite`: then the report's files go among them and nothing else is touched)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    if out.is_dir() and not overwrite:
        foreign = foreign_files(out, legacy)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise UserError(f"--out {out} holds files kdsweep did not write ({foreign[0]}{more}): choose a new or empty "
                            f"directory, or add --overwrite to write the report among them (nothing else is removed)")


def _merge(tmp: Path, out: Path, written: list[str], legacy: Callable[[str], bool]) -> None:
    """Move the report's files into a directory that also holds the user's: same names are replaced, nothing removed."""
    listed = (_listed(out, legacy) or set()) - {MARKER}
    for rel in written:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp / rel, out / rel)
        except OSError as e:
            raise UserError(f"cannot write {out / rel}: {e.strerror}") from None
    (out / MARKER).write_text(_MARKER_HEAD + "".join(f"{f}\n" for f in sorted(listed | set(written))))


@contextlib.contextmanager
def atomic_dir(out: Path, legacy: Callable[[str], bool] = lambda f: False, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside `out`; on success it replaces `out` (old one renamed aside, then deleted).

    A process killed while writing leaves `out` as it was (and a hidden `.OUT.kdsweep-tmp-PID-*`
    beside it, removed by the next call). Only a directory holding nothing but what an earlier report
    wrote (its marker lists the files) is replaced; one holding the user's files too is refused, or,
    with `overwrite`, gets the new files moved in among them (same names replaced, nothing removed).
    """
    out = Path(out).resolve()
    check_out(out, legacy, overwrite)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {parent} for --out: {e.strerror}") from None
    for kind in ("tmp", "old"):
        sweep_tmp(f".{out.name}.kdsweep-{kind}", parent)
    tmp = make_tmp(f".{out.name}.kdsweep-tmp", parent)
    try:
        yield tmp
        written = _files(tmp)
        if out.is_dir() and foreign_files(out, legacy):
            _merge(tmp, out, written, legacy)
            return
        (tmp / MARKER).write_text(_MARKER_HEAD + "".join(f"{f}\n" for f in written))
        old = None
        if out.exists():
            old = make_tmp(f".{out.name}.kdsweep-old", parent)
            os.rename(out, old / out.name)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when renamed into place
