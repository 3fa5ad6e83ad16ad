"""Why `--processes`: a step's Python holds the GIL, so two threads stepping side by side slow each other.

    PYTHONPATH=. python benchmarks/gil_threads.py

Times two steps of K = 16 MNIST-1D MLP students (40-100-100-10, stacked, one vmapped forward, one backward and
an update on one intra-op thread), alone on one thread, then on two threads at once and in two processes at once,
each thread or process with its own students: a plain step (cross-entropy only, few Python operations) and the step a sweep's fused group takes, with
kdsweep's own ce, vanilla_kd, pkt and cosine losses, each method's 4 members in one vmapped pass, as
training/fused.py computes them. Two processes share only the cores; two threads also share one GIL, which the
method losses' many small operations take and give back. Interleaved: each case in turn, --rounds times.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import threading
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from kdsweep.methods.registry import get_method
from kdsweep.models.zoo import Outputs, Shapes

K, B = 16, 100
METHODS = {"ce": {}, "vanilla_kd": {"temperature": 4.0, "alpha": 0.9}, "pkt": {"weight": 3e4}, "cosine": {"weight": 1.0}}


def students():
    return torch.nn.Sequential(torch.nn.Linear(40, 100), torch.nn.ReLU(), torch.nn.Linear(100, 100), torch.nn.ReLU())


def make_step(losses: bool):
    """One thread's step: its own K students, batch and (for `losses`) methods with per-member hyperparameters."""
    g = torch.Generator().manual_seed(0)
    bodies, heads = [students() for _ in range(K)], [torch.nn.Linear(100, 10) for _ in range(K)]
    params = {k: v.detach().requires_grad_() for k, v in stack_module_state(bodies)[0].items()}
    head = {k: v.detach().requires_grad_() for k, v in stack_module_state(heads)[0].items()}
    body0, head0 = copy.deepcopy(bodies[0]).to("meta"), copy.deepcopy(heads[0]).to("meta")
    x, y = torch.randn(B, 40, generator=g), torch.randint(0, 10, (B,), generator=g)
    t = Outputs(torch.randn(B, 10, generator=g), None, torch.randn(B, 64, generator=g))
    shapes, t_shapes = Shapes((100,), (100,), (10,)), Shapes((64, 1, 5), (64,), (10,))
    methods = [get_method(n)(hp, shapes, t_shapes, 30) for n, hp in METHODS.items()]
    hps = [{k: torch.rand(K // len(methods), generator=g) + 0.5 for k in m.hp} for m in methods]
    leaves = [*params.values(), *head.values()]

    def forward(p, h, inp):
        e = functional_call(body0, p, (inp,))
        return functional_call(head0, h, (e,)), e

    def method_losses(m, hp, s):
        def one(hp_one, s_one):
            own, m.hp = m.hp, hp_one
            try:
                return m(s_one, t, y, 0)
            finally:
                m.hp = own
        return vmap(one, in_dims=({k: 0 for k in hp}, Outputs(0, None, 0)), randomness="error")(hp, s)

    def step():
        logits, emb = vmap(forward, in_dims=(0, 0, None))(params, head, x)
        if losses:
            n = K // len(methods)
            total = sum(sum(method_losses(m, hp, Outputs(logits[i * n:(i + 1) * n], None, emb[i * n:(i + 1) * n])).values()).sum()
                        for i, (m, hp) in enumerate(zip(methods, hps)))
        else:
            total = F.cross_entropy(logits.reshape(-1, 10), y.repeat(K))
        grads = torch.autograd.grad(total, leaves)
        with torch.no_grad():
            torch._foreach_add_(leaves, grads, alpha=-1e-4)
    return step


def ms_per_step(steps: list, n: int) -> list[float]:
    """Each step function run `n` times, all on threads of their own at once; ms per step for each."""
    out = [0.0] * len(steps)

    def run(i):
        torch.set_num_threads(1)
        for _ in range(5):
            steps[i]()
        start = time.perf_counter()
        for _ in range(n):
            steps[i]()
        out[i] = (time.perf_counter() - start) / n * 1e3

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(steps))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out


def _in_process(losses: bool, n: int, barrier, results) -> None:
    torch.set_num_threads(1)
    step = make_step(losses)
    for _ in range(5):
        step()
    barrier.wait()
    start = time.perf_counter()
    for _ in range(n):
        step()
    results.put((time.perf_counter() - start) / n * 1e3)


def ms_per_step_in_processes(losses: bool, n: int, count: int = 2) -> list[float]:
    """The step run `n` times in each of `count` processes at once (started apart, timed together); ms per step."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(count), ctx.Queue()
    procs = [ctx.Process(target=_in_process, args=(losses, n, barrier, results)) for _ in range(count)]
    for p in procs:
        p.start()
    out = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; cores: {len(os.sched_getaffinity(0))}")
    rows: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for name, losses in (("plain step (cross-entropy)", False), ("with the 4 methods' losses", True)):
            alone = ms_per_step([make_step(losses)], args.steps)[0]
            side = ms_per_step([make_step(losses), make_step(losses)], args.steps)
            apart = ms_per_step_in_processes(losses, args.steps)
            rows.setdefault(name, []).append((alone, sum(side) / 2, sum(apart) / 2))
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"\n{'K = 16 students each':<28} {'ms/step alone':>14} {'two threads, each':>18} {'two processes, each':>20}")
    for name, vals in rows.items():
        for alone, side, apart in vals:
            print(f"{name:<28} {alone:14.2f} {side:12.2f} ({side / alone:.2f}x) {apart:13.2f} ({apart / alone:.2f}x)")


if __name__ == "__main__":
    main()
