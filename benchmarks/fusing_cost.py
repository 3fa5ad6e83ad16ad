"""What the CPU's fused-or-threads measurement costs a short study: `kdsweep bench`'s eight SmallNet students
(vanilla KD, synthetic images, random ResNet-18 teacher) in one lockstep group, timed per epoch, measuring as
kdsweep does by default with nothing kept from earlier runs, then as a later process does (the measurement
recalled from the cache folder, `kdsweep/training/fusing_memo.py`), then with fusing off (nothing measured), in
the same run. The cache folder is a temporary one: yours is neither read nor written.

    python benchmarks/fusing_cost.py [--epochs 3]

The difference in the first epoch between the first two rows is the measurement (steps of both paths on copies of the members); the
group's notes say which path it chose and both step times.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch

from kdsweep.methods.registry import get_method
from kdsweep.models.factory import build_model
from kdsweep.tools import bench
from kdsweep.training import loop
from kdsweep.training.loop import Accel, Lockstep, Member, Schedule
from kdsweep.training.teacher_outputs import TeacherCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    cfg = bench.BenchConfig(epochs=args.epochs, device="cpu")
    cfg.check()
    bench.prepare_cpu(None)
    _, data = bench._load(cfg, torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    teacher = build_model(cfg.teacher, data.in_shape, data.num_classes).eval().requires_grad_(False)
    new_student = bench._student_factory(cfg, data, torch.device("cpu"))
    bench._warm_up(teacher, new_student(), data, cfg.batch_size)
    lrs = [cfg.lr * 2 ** (i / (cfg.trials - 1) - 0.5) for i in range(cfg.trials)]
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    os.environ["KDSWEEP_CACHE"] = tempfile.mkdtemp(prefix="kdsweep-fusing-cost-")
    for label, accel in (("measured (default)", Accel()), ("recalled (default)", Accel()),
                         ("fusing off", Accel(fused=False))):
        loop._FUSING_PAYS.clear()  # each row a new process: only the cache folder remembers
        members = []
        for lr in lrs:
            s = new_student()
            method = get_method("vanilla_kd")({"temperature": 4.0, "alpha": 0.7}, s.shapes(data.in_shape),
                                              teacher.shapes(data.in_shape), args.epochs)
            members.append(Member(s, method, Schedule(args.epochs, cfg.batch_size, lr)))
        group = Lockstep(members, copy.deepcopy(teacher), data, cache=TeacherCache(1 << 30), accel=accel)
        start, epochs = time.perf_counter(), []
        while group.epoch():
            epochs.append(time.perf_counter() - start - sum(epochs))
        print(f"{label:<19} {sum(epochs):6.1f} s: epochs {', '.join(f'{e:.1f}' for e in epochs)} s; {group.notes}")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
