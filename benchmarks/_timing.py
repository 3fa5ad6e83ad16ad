"""A timing helper the benchmark scripts share (each runs as `python benchmarks/NAME.py`, so this folder is on
sys.path)."""

from __future__ import annotations

import time


def ms_per_call(fn, steps: int) -> float:
    """Milliseconds per call of `fn`, averaged over `steps` calls after three untimed ones (warm-up)."""
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps * 1e3
