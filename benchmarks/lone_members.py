"""A sweep's fused groups of many methods hold about one member per method: each such member's loss computed as
alone (kdsweep's way) against the same loss under a vmap over that one member (before 2026-12-05), in turn in
the same run.

    PYTHONPATH=. python benchmarks/lone_members.py [--per-method 2] [--epochs 4] [--rounds 2] [--skip crd,rkd,rkd_seed003]

Every method that serves MNIST-1D's pair (cnn1d -> mlp100, random teacher weights: a speed test), --per-method
members each with its own learning rate, fused (forced) on two worker threads: two fused groups of about one
member per method, as `kdsweep sweep --methods all --parallel 32` makes them. Prints seconds per epoch after the
first (the first holds the set-up) and the ratio; --skip leaves out the costly losses, whose own arithmetic
hides what the others save.
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
from kdsweep.training import fused
from kdsweep.training.loop import Accel, Lockstep, Member, Schedule


def seconds_an_epoch(data, teacher, args, skip: set[str]) -> float:
    torch.manual_seed(0)
    members = []
    for rep in range(args.per_method):
        for name in sorted(set(METHODS) - skip):
            cls, s = METHODS[name], build_model("mlp100", data.in_shape, data.num_classes)
            shapes = (s.shapes(data.in_shape), teacher.shapes(data.in_shape))
            if cls.unsupported(*shapes):
                continue
            method = cls({k: v.default for k, v in cls.space.items()}, *shapes, args.epochs)
            members.append(Member(s, method, Schedule(args.epochs, 100, 0.01 * (rep + 1))))
    group = Lockstep(members, teacher, data, accel=Accel(fused=True, cpu_workers=2))
    group.epoch()
    start = time.perf_counter()
    while group.epoch():
        pass
    return (time.perf_counter() - start) / (args.epochs - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-method", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip", default="crd,rkd,rkd_seed003", help="methods left out (comma-separated; '' for none)")
    args = ap.parse_args()
    os.environ["KDSWEEP_CACHE"] = tempfile.mkdtemp(prefix="kdsweep-lone-members-")
    torch.set_num_threads(1)
    data = load_data("mnist1d", None, None, 0, 0.1, torch.device("cpu"))
    teacher = build_model("cnn1d", data.in_shape, data.num_classes).eval().requires_grad_(False)
    skip = {m for m in args.skip.split(",") if m}
    as_alone = fused._Heads._unless_alone
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; left out: {', '.join(sorted(skip)) or 'none'}")

    def vmapped_too() -> float:
        fused._Heads._unless_alone = lambda self: None  # the reference: a lone member's loss under vmap too
        try:
            return seconds_an_epoch(data, teacher, args, skip)
        finally:
            fused._Heads._unless_alone = as_alone

    for r in range(args.rounds):  # each first in turn
        if r % 2:
            vmapped, alone = vmapped_too(), seconds_an_epoch(data, teacher, args, skip)
        else:
            alone, vmapped = seconds_an_epoch(data, teacher, args, skip), vmapped_too()
        print(f"round {r + 1}: lone members as alone {alone:.2f} s an epoch, under vmap {vmapped:.2f} s: "
              f"{vmapped / alone:.2f}x")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
