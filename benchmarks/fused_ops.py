"""Operations one lockstep step issues, serial vs fused: a CPU proxy for CUDA kernel launches.

    PYTHONPATH=. python benchmarks/fused_ops.py [--method vanilla_kd] [--student smallnet]

Counts the ATen operations (views, which launch no kernel, counted apart) that one training step of a
lockstep group of K students dispatches, after the group's first step, with fusion off (students one
after another) and on (kdsweep/fused.py). On CUDA each non-view operation is at least one kernel launch.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kdsweep.data.dispatch import load_data
from kdsweep.methods.base import SampleIndex
from kdsweep.methods.registry import get_method
from kdsweep.models.factory import build_model
from kdsweep.training.devices import Accel
from kdsweep.training.loop import Lockstep, Member, Schedule, run_taps


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        view = not func._schema.is_mutable and any(r.alias_info for r in func._schema.returns)
        self.views += view
        self.ops += not view
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="vanilla_kd")
    ap.add_argument("--student", default="smallnet")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 8])
    args = ap.parse_args()
    cpu = torch.device("cpu")
    data = load_data("synthetic", None, 300, 0, 0.1, cpu)
    torch.manual_seed(0)
    teacher = build_model("resnet18", data.in_shape, data.num_classes).eval().requires_grad_(False)
    t_shapes = teacher.shapes(data.in_shape)
    cls = get_method(args.method)
    hp = {k: v.default for k, v in cls.space.items()}
    x, y, ids = next(iter(data.epoch(0, 128, index=True)))
    index = SampleIndex(ids, data.n_train)
    print(f"{args.method}, {args.student}, batch 128: non-view ATen ops (views) in one lockstep step")
    for k in args.k:
        row = []
        for fused in (False, True):
            members = []
            for _ in range(k):
                s = build_model(args.student, data.in_shape, data.num_classes)
                members.append(Member(s, cls(hp, s.shapes(data.in_shape), t_shapes, 1), Schedule(1, 128, 0.05)))
            group = Lockstep(members, teacher, data, accel=Accel(fused=fused, cpu_workers=0))
            fmt = group.runs[0].fmt
            xs = {fmt: x.contiguous(memory_format=fmt)}
            with torch.no_grad():
                t = run_taps(teacher, xs[fmt], frozenset(cls.needs))
            group._steps(group.runs, xs, y, t, 0, index)  # the first step: the probe, which forms fused groups
            count = Count()
            with count:
                group._steps(group.runs, xs, y, t, 0, index)
            row.append(f"{'fused' if fused else 'serial'} {count.ops:5d} ({count.views})")
        print(f"  K={k:<3} " + "   ".join(row))


if __name__ == "__main__":
    main()
