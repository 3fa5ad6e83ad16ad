"""One fused group of 16 MNIST-1D MLP students on one thread, timed per epoch, by how many methods it holds:
why each worker of `--processes N` deals from its own slice of a sweep's studies (study/loop.py, `_dealing_order`).

    python benchmarks/group_composition.py [--epochs 4] [--rounds 2] [--pairs] [--kept]

The methods are those that serve the pair, without crd and rkd (whose losses dwarf the rest); each member
takes its method's default hyperparameters. With --pairs, the groups the two workers of the 4-method sweep
(ce, vanilla_kd, pkt, cosine) hold: the studies in halves, as they were dealt until 2026-12-06, or in turn,
as they are dealt now; and two other ways to deal them: crossed (ce with cosine, vanilla_kd with pkt), or
all four methods in each group. With --kept, the teacher's outputs are kept over the split, as a sweep keeps
them (training/teacher_outputs.py); without, the teacher runs every step.
The teacher is cnn1d with its random initial weights (a speed test: the losses cost the same); Adam, batch 100,
kdsweep's malloc settings. Prints each composition's seconds per epoch after the first.
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


def setup(prefix: str):
    """MNIST-1D and a cnn1d teacher with its random initial weights, on one thread with kdsweep's malloc settings
    (as a run on a CPU sets them: training/devices.py) and a cache folder of its own."""
    os.environ["KDSWEEP_CACHE"] = tempfile.mkdtemp(prefix=prefix)
    torch.set_num_threads(1)
    keep_freed_memory()
    data = load_data("mnist1d", None, None, 0, 0.1, torch.device("cpu"))
    return data, build_model("cnn1d", data.in_shape, data.num_classes).eval().requires_grad_(False)


def members(names: list[str], data, teacher, epochs: int) -> list[Member]:
    """An mlp100 student per name, with its method's default hyperparameters; Adam, batch 100."""
    torch.manual_seed(0)
    out = []
    for name in names:
        cls, student = METHODS[name], build_model("mlp100", data.in_shape, data.num_classes)
        shapes = (student.shapes(data.in_shape), teacher.shapes(data.in_shape))
        method = cls({k: v.default for k, v in cls.space.items()}, *shapes, epochs)
        out.append(Member(student, method, Schedule(epochs, 100, 0.01, optimizer="adam")))
    return out


def per_epoch(names: list[str], data, teacher, epochs: int, cache: TeacherCache | None = None) -> float:
    """Seconds an epoch of one fused group of `names` on one thread, after its first; `cache`: the teacher's outputs
    kept as a sweep keeps them (None: the teacher runs every step)."""
    group = Lockstep(members(names, data, teacher, epochs), teacher, data, accel=Accel(cpu_workers=1, fused=True),
                     cache=cache)
    group.epoch()  # the first holds the one-off set-up
    start = time.perf_counter()
    while group.epoch():
        pass
    return (time.perf_counter() - start) / (epochs - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pairs", action="store_true", help="the 4-method sweep's worker groups, dealt four ways")
    ap.add_argument("--kept", action="store_true", help="the teacher's outputs kept over the split, as a sweep does")
    args = ap.parse_args()
    data, teacher = setup("kdsweep-group-composition-")
    cache = TeacherCache(2**30) if args.kept else None
    if args.pairs:
        compositions = {"halves: ce, vanilla_kd x 8": ["ce", "vanilla_kd"] * 8,
                        "halves: pkt, cosine x 8": ["pkt", "cosine"] * 8,
                        "in turn: ce, pkt x 8": ["ce", "pkt"] * 8,
                        "in turn: vanilla_kd, cosine x 8": ["vanilla_kd", "cosine"] * 8,
                        "crossed: ce, cosine x 8": ["ce", "cosine"] * 8,
                        "crossed: vanilla_kd, pkt x 8": ["vanilla_kd", "pkt"] * 8,
                        "all four x 4": ["ce", "vanilla_kd", "pkt", "cosine"] * 4}
    else:
        probe = build_model("mlp100", data.in_shape, data.num_classes)
        cheap = [n for n in sorted(METHODS) if not n.startswith(("crd", "rkd"))
                 and not METHODS[n].unsupported(probe.shapes(data.in_shape), teacher.shapes(data.in_shape))]
        compositions = {f"{len(cheap)} methods, round-robin": [cheap[i % len(cheap)] for i in range(16)],
                        "8 methods x 2": [cheap[i % 8] for i in range(16)],
                        "4 methods x 4": [cheap[i % 4] for i in range(16)],
                        "2 methods x 8": [cheap[i % 2] for i in range(16)]}
        print(f"methods: {', '.join(cheap)}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    for r in range(args.rounds):
        for label, names in compositions.items():
            seconds = per_epoch(names, data, teacher, args.epochs, cache)
            print(f"round {r + 1}, {label:<32} {seconds:.3f} s an epoch", flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
