"""`kdsweep confirm` as one process against `--processes 2`, alternated on one store, in the same run.

    python benchmarks/verdict.py --methods all --budget-epochs 300 --parallel 16 --processes 2 --no-resume --keep DIR
    PYTHONPATH=. python benchmarks/confirm_processes.py DIR [--seeds 5] [--rounds 2]

Each step adds `--seeds` more confirmation seeds to every study of the kept MNIST-1D store (seeds
already there are reused, so every step trains the same number of new ones): one process on every core,
then two worker processes, in turn (the second round starts with two). Prints each step's wall time, the
load average around it, and the ratio of one process to two.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def step(store: str, seeds: int, processes: int) -> float:
    argv = [sys.executable, "-m", "kdsweep.cli", "confirm", "--dataset", "mnist1d", "--tracking-uri",
            f"sqlite:///{os.path.abspath(store)}/mlflow.db", "--seeds", str(seeds), "--quiet"]
    start = time.perf_counter()
    out = subprocess.run(argv + (["--processes", str(processes)] if processes > 1 else []), capture_output=True, text=True)
    took = time.perf_counter() - start
    if out.returncode:
        sys.exit(f"confirm failed:\n{out.stderr[-3000:]}")
    trained = sum(int(line.split(", ")[1].split()[0]) for line in out.stdout.splitlines() if " trained, " in line)
    print(f"  {'one process' if processes == 1 else f'{processes} processes':<12} seeds to {seeds:3d}: {took:7.1f} s, "
          f"{trained} runs trained (load {' '.join(f'{v:.2f}' for v in os.getloadavg())})", flush=True)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store", help="a folder kept by benchmarks/verdict.py --keep")
    ap.add_argument("--seeds", type=int, default=5, help="seeds added by each step (default: 5, as the verdict's)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{os.path.abspath(args.store)}/mlflow.db")
    have = max((int(r.data.tags["kdsweep.confirm_seed"]) for e in client.search_experiments()
                for r in client.search_runs([e.experiment_id], "tags.`kdsweep.role` = 'confirm'", max_results=10000)),
               default=0)  # seeds are numbered from the study's seed + 1
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {have} seeds there", flush=True)
    for r in range(args.rounds):
        walls = {}
        for processes in ((1, 2) if r % 2 == 0 else (2, 1)):
            have += args.seeds
            walls[processes] = step(args.store, have, processes)
        print(f"round {r + 1}: one process / two = {walls[1] / walls[2]:.2f}", flush=True)


if __name__ == "__main__":
    main()
