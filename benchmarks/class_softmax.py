"""torch's cross-entropy and log-softmax over 10 classes against kdsweep/methods/softmax.py's, on one CPU thread.

    python benchmarks/class_softmax.py [--rounds 2]

Forward and backward of a batch of 100 MNIST-1D-sized logits (B = 100, C = 10): for K members under vmap,
as a fused group computes a method's loss, and for a lone member without vmap. Both forms are timed in turn
in this one process; the ratio is torch's time over kdsweep's (above 1: kdsweep's is faster).
"""

from __future__ import annotations

import argparse
import os
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
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
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
