"""crd's NCE loss over a bank of at most K rows, forward and backward: its gradient by hand (crd._CountedNCE)
against autograd's over the same counted form (the form kdsweep used before), in turn in one run.

    PYTHONPATH=. python benchmarks/crd_nce.py [--batch 100] [--train 3600] [--rounds 3] [--steps 40]

Per direction and step, on one thread with the process set up as a CPU run is (devices.prepare_cpu): the student's
128-d embeddings scored against a bank of --train rows (MNIST-1D's 3,600 by default), with 16,384 negatives a
sample given as counts. crd computes two such directions a member-step. The by-hand timing includes nothing the
autograd one leaves out; the autograd one also leaves out the bank's copy it needs (the by-hand form needs none).
Single numbers per round: run it on a quiet machine (the load average is printed).
"""

from __future__ import annotations

import argparse
import os

import torch
from _timing import ms_per_call

from kdsweep.methods.crd import EPS, NCE_K, NCE_T, _CountedNCE, count_draws
from kdsweep.training.devices import prepare_cpu


def by_autograd(v, bank, ids, counts, z, k_pn):
    """The counted NCE loss written out in torch ops, differentiated by autograd."""
    e_all = torch.exp(v @ bank.t() / NCE_T)
    pos, p_all = torch.gather(e_all, 1, ids[:, None]) / z, e_all / z
    log_d1 = (pos / (pos + k_pn + EPS)).log()
    log_d0 = (k_pn / (p_all + k_pn + EPS)).log()
    return -(log_d1.sum() + (counts * log_d0).sum()) / v.shape[0]


def by_hand(v, bank, ids, counts, z, k_pn):
    return _CountedNCE.apply(v, bank, ids, counts, z, k_pn, torch.is_grad_enabled())[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--train", type=int, default=3600, help="bank rows (at most 16,384: the counted form)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    prepare_cpu(1)
    g = torch.Generator().manual_seed(0)
    b, n = args.batch, args.train
    v0 = torch.nn.functional.normalize(torch.randn(b, 128, generator=g), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(n, 128, generator=g), dim=1)
    ids = torch.randperm(n, generator=g)[:b]
    counts = count_draws(torch.randint(0, n, (b, NCE_K), generator=g), n)
    z = torch.exp(v0 @ bank.t() / NCE_T).mean() * n
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; batch {b}, bank {n} rows, one thread")

    def step(fn):
        v = v0.clone().requires_grad_()
        fn(v, bank, ids, counts, z, NCE_K / n).backward()
        return v.grad

    far = (step(by_hand) - step(by_autograd)).abs().max() / step(by_autograd).abs().max()
    print(f"gradients: by hand against autograd, max difference {far:.1e} of the largest entry")
    ways = [("by hand", by_hand), ("autograd", by_autograd)]
    for r in range(args.rounds):
        took = {name: ms_per_call(lambda fn=fn: step(fn), args.steps) for name, fn in (ways if r % 2 == 0 else ways[::-1])}
        print(f"round {r + 1}: by hand {took['by hand']:.2f} ms, autograd {took['autograd']:.2f} ms a direction-step "
              f"({took['autograd'] / took['by hand']:.2f}x)", flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
