"""Nothing left behind: MLflow runs of dead processes, temporary directories, half-written report directories.

* Runs. `confirm` and `report` runs carry their owner (node, host, pid, start
  time: workers.Owner) in the tag `kdsweep.owner`. The next `confirm` or
  `report` on the same experiment closes RUNNING runs whose owner ran on this
  node and is gone, as KILLED with `kdsweep.reason`. (Trial runs are
  reconciled against Optuna instead, in study.py.)
* Temporary directories carry the pid of their process in their name; they
  are removed on every exit Python sees, and the next run removes those of
  processes that were killed outright.
* `report --out DIR` is written to a sibling temp directory and renamed into
  place at the end, so a killed report never leaves a DIR that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import UserError
from .workers import Owner

OWNER_TAG = "kdsweep.owner"
_TMP = re.compile(r"^(?P<prefix>.*)-(?P<pid>\d+)-[^-]+$")


# ---------------------------------------------------------------- runs


def owner_tags() -> dict[str, str]:
    """Tags that let a later process tell whether this one is still running the run."""
    return {OWNER_TAG: json.dumps(Owner.me().as_attr(), sort_keys=True)}


def run_owner(run) -> Owner | None:
    try:
        return Owner.from_attr(json.loads(run.data.tags.get(OWNER_TAG, "")))
    except ValueError:
        return None


def close_dead_runs(tracker, experiment_id: str, roles: Iterable[str], say: Callable[[str], None] = print) -> int:
    """Close the RUNNING runs of `roles` whose owner process is gone; return how many.

    Runs without an owner (older kdsweep) or owned on another machine are left alone: nothing here
    can tell whether they still run.
    """
    closed = 0
    for role in roles:
        for run in tracker.find_runs(experiment_id, {"kdsweep.role": role}, statuses=("RUNNING",)):
            owner = run_owner(run)
            if owner is None or owner.alive() is not False:
                continue
            reason = f"its process {owner} is gone (killed or crashed)"
            tracker.close(run.info.run_id, "KILLED", {"kdsweep.state": "FAIL", "kdsweep.reason": reason})
            say(f"closed {role} run {run.info.run_id}, left RUNNING: {reason}")
            closed += 1
    return closed


# ---------------------------------------------------------------- temporary directories


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


# ---------------------------------------------------------------- report directories

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
