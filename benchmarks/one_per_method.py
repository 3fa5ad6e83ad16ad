"""One lockstep group of one MNIST-1D member per method (as `kdsweep confirm` trains seed k), timed per epoch,
with members dealt to the worker threads and fused groups by their first step's cost (kdsweep's way) and
round-robin (as before 2026-12-05), one after the other in the same run.

    python benchmarks/one_per_method.py [--epochs 3] [--rounds 2]

The teacher is cnn1d with its random initial weights (a speed test: the losses cost the same); Adam,
batch 100. Prints each round's seconds per epoch after the first (the first holds the one-off set-up:
fused-or-threads measurement, crd's bank) and where the members went.
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
from kdsweep.training import loop
from kdsweep.training.loop import Accel, Lockstep, Member, Schedule


def one_round(data, teacher, epochs: int, by_cost: bool) -> tuple[float, list]:
    first_step = loop._first_step
    if not by_cost:
        loop._first_step = lambda r: 1.0  # equal costs: dealt in turn
    loop._FUSING_PAYS.clear()  # each round measures fused against threads for itself (nothing kept on disk)
    os.environ["KDSWEEP_CACHE"] = tempfile.mkdtemp(prefix="kdsweep-one-per-method-")
    try:
        torch.manual_seed(0)
        members = []
        for name in sorted(METHODS):
            cls, s = METHODS[name], build_model("mlp100", data.in_shape, data.num_classes)
            shapes = (s.shapes(data.in_shape), teacher.shapes(data.in_shape))
            if cls.unsupported(*shapes):
                continue
            method = cls({k: v.default for k, v in cls.space.items()}, *shapes, epochs)
            members.append(Member(s, method, Schedule(epochs, 100, 0.01, optimizer="adam")))
        group = Lockstep(members, teacher, data, accel=Accel())
        group.epoch()
        start = time.perf_counter()
        while group.epoch():
            pass
        per_epoch = (time.perf_counter() - start) / (epochs - 1)
        where = [[type(r.m.method).__name__ for r in g.runs] for g in group.groups] or ["worker threads", *group.notes]
        return per_epoch, where
    finally:
        loop._first_step = first_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    data = load_data("mnist1d", None, None, 0, 0.1, torch.device("cpu"))
    teacher = build_model("cnn1d", data.in_shape, data.num_classes).eval().requires_grad_(False)
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for r in range(args.rounds):
        for by_cost in (True, False):
            seconds, where = one_round(data, teacher, args.epochs, by_cost)
            print(f"round {r + 1}, dealt {'by cost    ' if by_cost else 'round-robin'}: {seconds:.2f} s an epoch; {where}")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
