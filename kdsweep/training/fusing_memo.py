"""Whether fusing paid on this machine, kept across processes.

On CPU a lockstep group measures once whether its members step faster fused or on the worker threads
(`loop.Lockstep._fusing_pays`). That costs real steps: about 13 s of a 44 s `kdsweep bench` study on 2 cores,
where a fused step of eight small convolutions takes 3 s. The answer belongs to the machine, not to the process,
so it is kept in the cache folder, one small JSON file per question, and the next process reads it instead.

Keyed by everything the answer depends on: CPU model and usable cores, torch version, the students'
architecture, parameter shapes, optimiser and memory format, the batch's shape, the methods (how many of each)
and the worker threads. A recalled answer also makes a run's choice, and so its floating-point path, the same
as the run that measured it. Delete `<cache>/fusing/` to measure again (after a BIOS or kernel change, say).
An answer measured while other work held every core (1-minute load above the usable cores) is measured again by
the first process that finds the machine quiet (load at most half the cores): the two paths use the cores
differently, so contention can reverse which one wins, and a measurement taken then should not decide for good.

Only speed depends on this file: a missing, unreadable or corrupt one is measured again, a cache folder that
cannot be written keeps the answer for the process only. Concurrent writers each write a whole file (a
rename), so a reader sees one measurement or another, never half of one.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from kdsweep.common import processes
from kdsweep.common.atomic import atomic_write_text
from kdsweep.common.cache import cache_dir


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def question(student: torch.nn.Module, optimizer: object, memory_format: object, batch_shape: tuple[int, ...],
             methods: tuple[tuple[str, int], ...], workers: int) -> dict:
    """What the answer depends on, as plain JSON values (equal questions on equal machines get one file)."""
    cls = type(student)
    return {
        "cpu": _cpu_model(), "cores": processes.cores(), "torch": torch.__version__,
        "student": f"{cls.__module__}.{cls.__qualname__}", "architecture": repr(student),
        "shapes": [[n, list(t.shape), str(t.dtype)] for n, t in [*student.named_parameters(),
                                                                *student.named_buffers()]],
        "optimizer": repr(optimizer), "memory_format": str(memory_format), "batch": list(batch_shape),
        "methods": [[name, count] for name, count in methods], "workers": workers,
    }


def folder() -> Path:
    return cache_dir() / "fusing"


def _path(q: dict) -> Path:
    return folder() / f"{hashlib.sha256(json.dumps(q, sort_keys=True).encode()).hexdigest()[:32]}.json"


def recall(q: dict) -> dict | None:
    """The answer measured earlier for `q` ({"fused": bool, "fused_ms", "threads_ms", "measured"}), else None."""
    try:
        kept = json.loads(_path(q).read_text())
        if kept["question"] == q and isinstance(kept["fused"], bool):
            return kept
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def contended(kept: dict) -> str | None:
    """Why a kept answer should be measured again now: it was measured on a busy machine and this one is quiet."""
    then, here = (kept.get("load") or [0.0])[0], processes.cores()
    now = os.getloadavg()[0]
    if then > here and now <= here / 2:
        return f"measured again: the kept answer was measured at load {then:.1f} on {here} cores, the load is {now:.1f} now"
    return None


def remember(q: dict, fused: bool, fused_seconds: float, threads_seconds: float) -> str | None:
    """Keep the answer for later processes; returns why it could not be kept (nothing else depends on it)."""
    kept = {"question": q, "fused": fused, "fused_ms": round(fused_seconds * 1e3, 2),
            "threads_ms": round(threads_seconds * 1e3, 2), "load": [round(v, 2) for v in os.getloadavg()],
            "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        atomic_write_text(json.dumps(kept, indent=1) + "\n", _path(q))
    except OSError as e:
        return f"could not keep the measurement in {_path(q).parent}: {e.strerror or e}"
    return None
