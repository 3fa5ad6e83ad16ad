"""Per-trial seconds of K lockstep students on CPU: serial trials vs worker threads vs fused (kdsweep/fused.py).

    PYTHONPATH=. python benchmarks/fused_cpu.py [--k 8] [--images 1024] [--epochs 2] [--rounds 2]

Synthetic CIFAR-shaped data, SmallNet students with vanilla KD from a ResNet-18 (random weights: a speed
test only). The teacher's outputs are put in a shared cache first (untimed), so every path reads them
and only the students' work is timed. Paths, each run once per round, round-robin (this machine is
shared: every path sees the same load on average):

  serial             K trials one after another (each K = 1 group on the default CPU path)
  worker threads     one lockstep group of K, students dealt to one thread per core (the CPU default)
  fused, 1 thread    one lockstep group of K, stacked (Accel(fused=True)); runs on one intra-op thread
                     (the group's epoch pins intra-op threads to 1 while worker threads exist)
  fused, intra-op    the same with --cpu-workers 0: the fused step's ops over the intra-op threads

Prints wall seconds per trial (the group's wall time / K) for each round and the load average.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from kdsweep.data.dispatch import load_data
from kdsweep.methods.registry import get_method
from kdsweep.models.factory import build_model
from kdsweep.training.devices import Accel, prepare_cpu
from kdsweep.training.loop import Lockstep, Member, Schedule
from kdsweep.training.teacher_outputs import TeacherCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    threads = prepare_cpu()
    cpu = torch.device("cpu")
    data = load_data("synthetic", None, int(args.images / 0.9) + 1, 0, 0.1, cpu)
    torch.manual_seed(0)
    teacher = build_model("resnet18", data.in_shape, data.num_classes).eval().requires_grad_(False)
    t_shapes = teacher.shapes(data.in_shape)
    k, e = args.k, args.epochs
    lrs = [0.05 * 2 ** (i / max(1, k - 1) - 0.5) for i in range(k)]

    def members(lrs_):
        out = []
        for lr in lrs_:
            torch.manual_seed(1)
            s = build_model("smallnet", data.in_shape, data.num_classes)
            m = get_method("vanilla_kd")({"temperature": 4.0, "alpha": 0.7}, s.shapes(data.in_shape), t_shapes, e)
            out.append(Member(s, m, Schedule(e, 128, lr), rng=(torch.get_rng_state(), None)))
        return out

    cache = TeacherCache(2**30)

    def run(groups: list[list[float]], accel: Accel) -> float:
        t0 = time.perf_counter()
        for g in groups:
            lock = Lockstep(members(g), teacher, data, cache=cache, accel=accel)
            while lock.epoch():
                pass
        return time.perf_counter() - t0

    run([lrs[:1]], Accel())  # fills the teacher cache for every epoch (and warms the kernels up)
    paths = {
        "serial": lambda: run([[lr] for lr in lrs], Accel(fused=False)),
        "worker threads": lambda: run([lrs], Accel(fused=False)),
        "fused, 1 thread": lambda: run([lrs], Accel(fused=True)),
        "fused, intra-op": lambda: run([lrs], Accel(fused=True, cpu_workers=0)),
    }
    print(f"K={k}, {data.n_train} images x {e} epochs, batch 128, smallnet <- resnet18 (cached), {threads} threads; "
          f"load average {os.getloadavg()[0]:.2f}")
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            times[name].append(fn() / k)
    for name, ts in times.items():
        print(f"  {name:<16} s/trial: " + "  ".join(f"{t:6.2f}" for t in ts) + f"   (min {min(ts):.2f})")
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
