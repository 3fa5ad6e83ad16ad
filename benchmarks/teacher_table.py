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
import tempfile
import time

import torch

from kdsweep.data.dispatch import load_data
from kdsweep.methods.registry import METHODS
from kdsweep.models.factory import build_model
from kdsweep.training.devices import keep_freed_memory
from kdsweep.training.loop import Accel, Lockstep, Member, Schedule
from kdsweep.training.teacher_outputs import TeacherCache


def train(names: list[str], data, teacher, epochs: int, table: bool) -> float:
    torch.manual_seed(0)
    members = []
    for name in names:
        cls, student = METHODS[name], build_model("mlp100", data.in_shape, data.num_classes)
        method = cls({k: v.default for k, v in cls.space.items()}, student.shapes(data.in_shape),
                     teacher.shapes(data.in_shape), epochs)
        members.append(Member(student, method, Schedule(epochs, 100, 0.01, optimizer="adam")))
    group = Lockstep(members, teacher, data, accel=Accel(cpu_workers=1, fused=True), cache=TeacherCache(1 << 28))
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
    os.environ["KDSWEEP_CACHE"] = tempfile.mkdtemp(prefix="kdsweep-teacher-table-")
    torch.set_num_threads(1)
    keep_freed_memory()
    data = load_data("mnist1d", None, None, 0, 0.1, torch.device("cpu"))
    teacher = build_model("cnn1d", data.in_shape, data.num_classes).eval().requires_grad_(False)
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
