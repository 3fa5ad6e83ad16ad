"""A command's start-up with Python's garbage collector paused until training (common/collector.py) or left on.

    python benchmarks/collector.py [--rounds 3] [--methods ce,vanilla_kd,pkt,cosine]

Makes a sweep's stores once (MNIST-1D, 30-epoch trials, one trial per method; not timed), then resumes it
with one more trial per method, again and again, alternating a process that pauses the collector as the
`kdsweep` command does (cli.entry) and one that leaves it on, as kdsweep did before. Each is a fresh
`kdsweep sweep` process run as the command runs (main, then release); printed: seconds from its start to
its first trial (from the Optuna store) and to its end, each with the collector's own time in the process
(gc.callbacks), and the ratio of the medians, paused / on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The command, as cli.entry runs it, pausing the collector or not, and the collector's own seconds to stderr.
CHILD = """
import gc, json, sys, time
spent = [0.0, 0.0]
def clock(phase, info):
    if phase == "start":
        spent[1] = time.perf_counter()
    else:
        spent[0] += time.perf_counter() - spent[1]
gc.callbacks.append(clock)
from kdsweep.common import collector
if sys.argv[1] == "paused":
    collector.pause()
from kdsweep import cli
code = cli.main(sys.argv[2:])
cli.release()
print(json.dumps({"gc": spent[0]}), file=sys.stderr)
sys.exit(code)
"""


def first_trial_after(storage: str, since: float) -> float:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    starts = [t.datetime_start.timestamp() for n in optuna.get_all_study_names(storage)
              for t in optuna.load_study(study_name=n, storage=storage).get_trials(deepcopy=False)
              if t.datetime_start is not None and t.datetime_start.timestamp() >= since]
    return min(starts) - since


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default="ce,vanilla_kd,pkt,cosine")
    args = ap.parse_args()
    n = len(args.methods.split(","))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{tmp}/optuna.db"

        def sweep(mode: str, trials_each: int) -> dict:
            argv = ["sweep", "--methods", args.methods, "--dataset", "mnist1d", "--epochs", "30", "--quiet",
                    "--budget-epochs", str(30 * trials_each), "--storage", storage,
                    "--tracking-uri", f"sqlite:///{tmp}/mlflow.db"]
            started = time.time()
            out = subprocess.run([sys.executable, "-c", CHILD, mode, *argv], env=env, cwd=tmp, capture_output=True,
                                 text=True)
            wall = time.time() - started
            if out.returncode:
                sys.exit(f"kdsweep {' '.join(argv)} failed:\n{out.stderr[-3000:]}")
            return {"first": first_trial_after(storage, started), "wall": wall,
                    "gc": json.loads(out.stderr.strip().splitlines()[-1])["gc"]}

        sweep("on", 1)  # the stores, and the teacher in the cache: not timed
        print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
        rows: dict[str, list[dict]] = {"paused": [], "on": []}
        trials = 1
        for r in range(args.rounds):
            for mode in ("paused", "on") if r % 2 == 0 else ("on", "paused"):
                trials += 1
                rows[mode].append(t := sweep(mode, trials))
                print(f"round {r + 1}, collector {mode:<6}: first trial at {t['first']:.2f} s, ended at "
                      f"{t['wall']:.2f} s ({n} trials on existing stores); collecting took {t['gc']:.2f} s", flush=True)
        print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for key, what in (("first", "to the first trial"), ("wall", "whole command")):
        p, o = (statistics.median(x[key] for x in rows[m]) for m in ("paused", "on"))
        print(f"{what}: median {p:.2f} s paused, {o:.2f} s on: {p / o:.2f} x")


if __name__ == "__main__":
    main()
