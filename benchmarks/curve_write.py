"""A trial's curve written to Optuna's SQLite storage at its end: kdsweep's `write_reports` against Optuna's
per-value write in one transaction (what kdsweep did before) and against `Trial.report`, a commit per value.

    python benchmarks/curve_write.py [--values 30] [--trials 16] [--rounds 3]

Each way writes the curves of `--trials` new trials of one study on a new SQLite file (WAL, as kdsweep sets it
up), alternating; prints milliseconds per trial.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import optuna
from optuna.storages._rdb.storage import _create_scoped_session

from kdsweep.common.sqlite_stores import use_write_ahead_log
from kdsweep.study.pruning import write_reports


def per_value(storage, trial_id: int, values: dict[int, float]) -> None:
    """Optuna's own write of each value, all in one transaction."""
    with _create_scoped_session(storage.scoped_session, True) as session:
        for step, value in values.items():
            storage._set_trial_intermediate_value_without_commit(session, trial_id, step, value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--values", type=int, default=30)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    use_write_ahead_log()
    storage = optuna.storages.RDBStorage(f"sqlite:///{tempfile.mkdtemp(prefix='kdsweep-curve-write-')}/optuna.db")
    study = optuna.create_study(storage=storage, direction="maximize")
    curve = {e: 0.5 + e / 1000 for e in range(args.values)}

    def report(trial: optuna.Trial) -> None:
        for step, value in curve.items():
            trial.report(value, step)

    ways = {"write_reports": lambda t: write_reports(storage, t._trial_id, curve),
            "Optuna's per-value write, one transaction": lambda t: per_value(storage, t._trial_id, curve),
            "Trial.report, a commit each": report}
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    for r in range(args.rounds):
        for name, write in ways.items():
            seconds = 0.0
            for _ in range(args.trials):
                trial = study.ask()
                start = time.perf_counter()
                write(trial)
                seconds += time.perf_counter() - start
                study.tell(trial, 0.0)
            print(f"round {r + 1}, {name:<42} {seconds / args.trials * 1e3:6.1f} ms a trial of {args.values} values",
                  flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
