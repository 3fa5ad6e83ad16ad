"""The teacher's outputs per step against one table over the training split (training/teacher_outputs.py): what
a sweep's first group in each process gains on unaugmented data.

    python benchmarks/teacher_table.py [--epochs 6] [--rounds 3]

One fused group of 16 MNIST-1D MLP students (two methods x 8, as a worker of the 4-method sweep holds) on one
thread with kdsweep's malloc settings, each with a fresh teacher cache, as a new process has: `per step` computes
the teacher on each batch and keeps it (the path for augmented data), `table` runs it once over the split. The
teacher is cnn1d with its random initial weights (a speed test). Both ways alternate; the seconds are the whole
group's training, first epoch (the table's pass) included.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from group_composition import members, setup  # noqa: E402

from kdsweep.training.loop import Accel, Lockstep  # noqa: E402
from kdsweep.training.teacher_outputs import TeacherCache  # noqa: E402


def train(names: list[str], data, teacher, epochs: int, table: bool) -> float:
    group = Lockstep(members(names, data, teacher, epochs), teacher, data, accel=Accel(cpu_workers=1, fused=True),
                     cache=TeacherCache(1 << 28))
    group.feed.whole = table
    start = time.perf_counter()
    while group.epoch():
        pass
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    data, teacher = setup("kdsweep-teacher-table-")
    compositions = {"ce, vanilla_kd x 8": ["ce", "vanilla_kd"] * 8, "pkt, cosine x 8": ["pkt", "cosine"] * 8}
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    for r in range(args.rounds):
        for label, names in compositions.items():
            a = train(names, data, teacher, args.epochs, table=False)
            b = train(names, data, teacher, args.epochs, table=True)
            print(f"round {r + 1}, {label:<20} {args.epochs} epochs: per step {a:.2f} s, table {b:.2f} s "
                  f"({a / b:.2f}x)", flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
