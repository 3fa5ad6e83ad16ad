"""A sweep with kdsweep's malloc settings (devices.keep_freed_memory) against the same sweep with glibc's defaults,
alternated in one run.

    python benchmarks/allocator.py [--rounds 2] [-- SWEEP ARGS]

Runs `kdsweep sweep` (by default every MNIST-1D method, 60 epochs each, --parallel 16 --processes 2) on new stores,
each round once with glibc's defaults (MALLOC_CHECK_=0 in its environment: a MALLOC_* variable makes kdsweep leave
malloc alone, and this one changes nothing else) and once as a user runs it, the first of the two taking turns.
Prints each command's wall, user and kernel seconds and minor page faults (its worker processes included), the
load average, and the ratio of the wall times.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

from kdsweep.training.devices import sets_allocator

SWEEP = ["--methods", "all", "--dataset", "mnist1d", "--epochs", "30", "--budget-epochs", "60", "--parallel", "16",
         "--processes", "2", "--quiet"]


def run(args: list[str], defaults: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not sets_allocator(k)}  # neither run inherits a choice of yours
    if defaults:
        env["MALLOC_CHECK_"] = "0"
    with tempfile.TemporaryDirectory(prefix="kdsweep-allocator-") as d:
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "kdsweep.cli", "sweep", *args], cwd=d, env=env, capture_output=True,
                             text=True)
        if out.returncode:
            sys.exit(f"the sweep failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall": wall, "user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime,
            "faults": after.ru_minflt - before.ru_minflt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("sweep", nargs="*", help="the sweep's arguments, after --")
    args = ap.parse_args()
    sweep = args.sweep or SWEEP
    print(f"kdsweep sweep {' '.join(sweep)}")
    for r in range(args.rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        took = {}
        for defaults in order:
            took[defaults] = m = run(sweep, defaults)
            print(f"round {r + 1}, {'glibc defaults ' if defaults else 'kdsweep settings'}: {m['wall']:6.1f} s wall, "
                  f"{m['user']:6.1f} s user, {m['sys']:5.1f} s kernel, {m['faults']:>9,} page faults; "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
        print(f"round {r + 1}: defaults / kdsweep settings = {took[True]['wall'] / took[False]['wall']:.2f}x")


if __name__ == "__main__":
    main()
