"""Python's cyclic garbage collector over a command's start-up: paused, then what start-up made is frozen.

A command's start-up imports torch, optuna, mlflow, sqlalchemy and their kin, then opens its stores: about
half a million objects that live as long as the process. Left on, the collector walks every one of them at
each full collection, and it runs one each time the objects that survived grow by a quarter: six during the
imports alone on this 2-core machine (0.5 s of a 2.5 s start-up), and about 0.2 s each after them
(benchmarks/collector.py). Those objects are not garbage, so the walks find nothing.

So `entry` (the `kdsweep` command) pauses the collector, and training's first step resumes it
(`training.loop.Lockstep`): `gc.freeze` moves everything alive then out of the collector's sight, and later
collections walk only what training makes. Only a command's process is paused: a notebook or a test that calls
kdsweep's functions keeps its collector as it is. A command that never trains (report, status, ui) keeps it
paused to its end: reference counting still frees its objects; only reference cycles wait for the process's exit.
"""

from __future__ import annotations

import gc

_paused = False  # paused by `pause`, not yet resumed


def pause() -> None:
    """Stop automatic collection until `resume` (a no-op if it is already off: someone else's choice)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume() -> None:
    """Freeze what is alive now and collect automatically again; does nothing unless `pause` paused it."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()
