"""A fused group's Adam update in C (training/fused_adam.c) against the same update in torch's ops, in one run.

    python benchmarks/fused_adam.py [--epochs 6] [--rounds 2]

Times, alternating the two paths ($KDSWEEP_NATIVE=0 for torch's ops, which turns off every C kernel; none of
these groups' losses has one): the update alone on a 16-member MNIST-1D MLP group's stacked parameters, and
an epoch of three groups of 16 on one thread: the two the 4-method sweep's workers hold (ce and pkt, vanilla_kd
and cosine, in turn) and 16 of ce. Setting as benchmarks/group_composition.py (cnn1d teacher with its random
initial weights, teacher outputs kept over the split as a sweep keeps them, Adam, batch 100).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from group_composition import per_epoch, setup

from kdsweep.common import native
from kdsweep.training.fused import FusedOptimizer
from kdsweep.training.loop import Schedule
from kdsweep.training.teacher_outputs import TeacherCache


def update_ms(steps: int = 300) -> float:
    """Milliseconds per update of 16 stacked 40-100-100-10 MLPs, weight decay on."""
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 40, 100), (16, 1, 100), (16, 100, 100), (16, 1, 100), (16, 100, 10), (16, 1, 10)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) * 1e-2 for s in shapes]
    opt = FusedOptimizer("adam", params, [Schedule(30, 100, 1e-3 * (1 + i), weight_decay=5e-4, optimizer="adam")
                                          for i in range(16)], total_steps=10_000)
    for _ in range(5):
        opt.step(params, grads)
    start = time.perf_counter()
    for _ in range(steps):
        opt.step(params, grads)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    data, teacher = setup("kdsweep-fused-adam-")
    cache = TeacherCache(2**30)
    groups = {"ce, pkt x 8": ["ce", "pkt"] * 8, "vanilla_kd, cosine x 8": ["vanilla_kd", "cosine"] * 8,
              "ce x 16": ["ce"] * 16}
    paths = {"C": "1", "torch's ops": "0"}
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    seen: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for path, flag in (paths.items() if r % 2 == 0 else reversed(paths.items())):
            os.environ[native.ENV] = flag
            for label, value in [("update, ms", update_ms()),
                                 *((f"{g}, s an epoch", per_epoch(n, data, teacher, args.epochs, cache))
                                   for g, n in groups.items())]:
                seen.setdefault((label, path), []).append(value)
                print(f"round {r + 1}, {path:<11} {label:<36} {value:.3f}", flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for label in dict.fromkeys(k for k, _ in seen):
        c, t = (min(seen[(label, p)]) for p in paths)
        print(f"{label:<36} best C {c:.3f}, best torch's ops {t:.3f}: {c / t:.2f} x")


if __name__ == "__main__":
    main()
