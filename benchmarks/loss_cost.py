"""What one member's loss costs per step, for every method that can serve MNIST-1D's pair (cnn1d -> mlp100).

    python benchmarks/loss_cost.py [--batch 100] [--train 3600] [--threads 1]

Times each method's loss terms, forward and backward, on the real models' taps of a random batch (the
students' own forward and backward not counted), with the default hyperparameters: the part of a trial's
step that differs between methods. crd's draw of 16,384 negatives per sample (and their counts) is
timed on its own row: in a sweep the members of one study draw each step's negatives once and share
them, so a member pays the rest. Single numbers from one run: compare rows, and run it on a quiet
machine (the load average is printed).
"""

from __future__ import annotations

import argparse
import os

import torch
from _timing import ms_per_call

from kdsweep.methods import crd
from kdsweep.methods.base import SampleIndex
from kdsweep.methods.registry import METHODS
from kdsweep.models.factory import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--train", type=int, default=3600, help="training rows (crd's bank)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    in_shape, classes, b = (1, 40), 10, args.batch
    student, teacher = build_model("mlp100", in_shape, classes), build_model("cnn1d", in_shape, classes)
    x, y = torch.randn(b, *in_shape), torch.randint(0, classes, (b,))
    with torch.no_grad():
        t = teacher.taps(x)
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; batch {b}, {args.threads} thread(s); "
          "ms per step, forward + backward of the loss terms")
    for name in sorted(METHODS):
        cls, shapes = METHODS[name], (student.shapes(in_shape), teacher.shapes(in_shape))
        why = cls.unsupported(*shapes)
        if why:
            print(f"{name:<18}       -   ({why})")
            continue
        method = cls({k: v.default for k, v in cls.space.items()}, *shapes, 30).train()

        def step() -> None:
            s = student.taps(x)
            s = type(s)(*(v.detach().requires_grad_() for v in s))
            extra = {"index": SampleIndex(torch.randperm(args.train)[:b], args.train)} if cls.needs_index else {}
            sum(method(s, t, y, 5, **extra).values()).backward()

        print(f"{name:<18} {ms_per_call(step, args.steps):7.2f}", flush=True)
    words, step_no = crd.position_words(b, crd.NCE_K, torch.device("cpu")), torch.zeros((), dtype=torch.long)
    in_c = crd.counts_in_c(torch.device("cpu"), b, crd.NCE_K)

    def draw() -> None:
        step_no.add_(1)
        if in_c:  # as crd's step draws them here: counts only, in C (crd_draw.c)
            crd.counted_draws(0, int(step_no), b, crd.NCE_K, args.train)
        else:
            crd.count_draws(crd.draw_negatives(0, step_no, words, args.train), args.train)

    print(f"{'(crd draw)':<18} {ms_per_call(draw, args.steps):7.2f}   its 16,384 negatives per sample and their counts "
          f"({'in C' if in_c else 'in torch ops'}), included in crd's row")


if __name__ == "__main__":
    main()
