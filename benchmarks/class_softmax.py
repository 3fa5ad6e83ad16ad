"""torch's cross-entropy and log-softmax over 10 classes against kdsweep/methods/softmax.py's, on one CPU thread.

    python benchmarks/class_softmax.py [--rounds 2] [--groups]

Forward and backward of a batch of 100 MNIST-1D-sized logits (B = 100, C = 10): for K members under vmap,
as a fused group computes a method's loss, and for a lone member without vmap. With --groups, also whole
fused groups of MNIST-1D MLP students per epoch (benchmarks/group_composition.py's timing), the methods
given torch's forms or kdsweep's in turn. Both forms are timed in turn in this one process; the ratio is
torch's time over kdsweep's (above 1: kdsweep's is faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.func import vmap

from kdsweep.methods import softmax

B, C = 100, 10


def _seconds(fn, x: torch.Tensor, n: int = 300) -> float:
    for _ in range(20):
        fn(x).sum().backward()
    start = time.perf_counter()
    for _ in range(n):
        fn(x).sum().backward()
    return (time.perf_counter() - start) / n


def groups(rounds: int) -> None:
    """Whole fused groups an epoch, each method module's cross_entropy and log_softmax swapped in turn."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from group_composition import per_epoch

    from kdsweep.data.dispatch import load_data
    from kdsweep.methods.registry import METHODS
    from kdsweep.models.factory import build_model
    from kdsweep.training.devices import keep_freed_memory

    os.environ["KDSWEEP_CACHE"] = tempfile.mkdtemp(prefix="kdsweep-class-softmax-")
    keep_freed_memory()
    data = load_data("mnist1d", None, None, 0, 0.1, torch.device("cpu"))
    teacher = build_model("cnn1d", data.in_shape, data.num_classes).eval().requires_grad_(False)
    probe = build_model("mlp100", data.in_shape, data.num_classes).shapes(data.in_shape)
    names = [n for n in sorted(METHODS) if not METHODS[n].unsupported(probe, teacher.shapes(data.in_shape))]
    modules = [sys.modules[METHODS[n].__module__] for n in names]
    theirs = {"cross_entropy": lambda z, y: F.cross_entropy(z.float(), y), "log_softmax": lambda z: F.log_softmax(z.float(), 1)}
    cheap = [n for n in names if not n.startswith(("crd", "rkd"))]
    compositions = {"every method x 1 (confirm)": names, "8 cheap methods x 2": [cheap[i % 8] for i in range(16)],
                    "ce, vanilla_kd x 8": ["ce", "vanilla_kd"] * 8, "vanilla_kd x 16 (a study)": ["vanilla_kd"] * 16}
    for r in range(rounds):
        for label, members in compositions.items():
            seconds = {}
            for form in ("torch", "kdsweep") if r % 2 == 0 else ("kdsweep", "torch"):
                for m in modules:
                    for k in theirs:
                        if hasattr(m, k):
                            setattr(m, k, theirs[k] if form == "torch" else getattr(softmax, k))
                seconds[form] = per_epoch(members, data, teacher, 3)
            print(f"{r + 1:>5} {label:<27} {seconds['torch']:9.3f} s {seconds['kdsweep']:9.3f} s "
                  f"{seconds['torch'] / seconds['kdsweep']:6.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--groups", action="store_true", help="also whole fused groups an epoch")
    args = ap.parse_args()
    torch.set_num_threads(1)
    y = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(0))
    forms = {
        "cross-entropy": (lambda z: F.cross_entropy(z, y), lambda z: softmax.cross_entropy(z, y)),
        "log-softmax": (lambda z: F.log_softmax(z, 1), softmax.log_softmax),
    }
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'round':>5} {'term':<14} {'members':>10} {'torch us':>9} {'kdsweep us':>11} {'ratio':>6}")
    for r in range(args.rounds):
        for term, (theirs, ours) in forms.items():
            for k in (None, 1, 2, 4, 8, 16, 32):
                x = torch.randn(k or 1, B, C).requires_grad_()
                if k is None:  # a lone member: no vmap
                    a, b = _seconds(lambda z: theirs(z[0]), x), _seconds(lambda z: ours(z[0]), x)
                else:
                    a, b = _seconds(vmap(theirs), x), _seconds(vmap(ours), x)
                label = "alone" if k is None else f"{k} (vmap)"
                print(f"{r + 1:>5} {term:<14} {label:>10} {a * 1e6:9.0f} {b * 1e6:11.0f} {a / b:6.2f}", flush=True)
    if args.groups:
        print(f"{'round':>5} {'group of 16 (an epoch)':<27} {'torch':>11} {'kdsweep':>11} {'ratio':>6}")
        groups(args.rounds)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
