"""How many DataLoader workers should the seed-style reference get? Interleave the candidates and measure.

    PYTHONPATH=. python benchmarks/reference_workers.py [--workers 0 1 2] [--images 1024] [--epochs 3]

One reference trial (kdsweep.tools.bench.reference_trial: seed 003's vanilla-KD loop, PIL transforms, teacher
forward every step) per worker count, on the bench's default data and models, an epoch of each in turn so
that every candidate sees the same load from other jobs.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

from kdsweep.models.factory import build_model
from kdsweep.tools.bench import (
    SEED_PAIR,
    BenchConfig,
    Phase,
    _load,
    _loaders,
    reference_trial,
)
from kdsweep.training.devices import prepare_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    cfg = BenchConfig(images=args.images, epochs=args.epochs)
    device = torch.device("cpu")
    threads = prepare_cpu()
    raw, data = _load(cfg, device)
    torch.manual_seed(cfg.seed)
    teacher = build_model(SEED_PAIR[0], data.in_shape, data.num_classes).eval().requires_grad_(False)
    phases = []
    for w in args.workers:
        train_loader, val_loader = _loaders(raw, data, cfg, w)
        torch.manual_seed(cfg.seed + 1)
        student = build_model(SEED_PAIR[1], data.in_shape, data.num_classes)
        steps = reference_trial(student, copy.deepcopy(teacher), train_loader, val_loader, device, cfg.epochs, cfg.lr)
        phases.append(Phase(f"{w} DataLoader worker{'s' * (w != 1)}", device, steps))
    before = os.getloadavg()
    pending = list(phases)
    while pending:
        pending = [p for p in pending if p.run_segment()]
    print(f"reference trial, {data.n_train} images x {cfg.epochs} epochs, {threads} intra-op threads; load average "
          f"{before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"  {'workers':<22} {'wall s':>8} {'cpu s':>8} {'images/s':>9}")
    for p in phases:
        print(f"  {p.name:<22} {p.wall:8.1f} {p.cpu:8.1f} {p.rate:9.1f}")


if __name__ == "__main__":
    main()
