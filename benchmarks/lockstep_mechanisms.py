"""How should K small students share one batch on this machine? Measure the candidate mechanisms.

    PYTHONPATH=. python benchmarks/lockstep_mechanisms.py [--k 8] [--steps 6] [--student smallnet] [--teacher resnet18]

Students (one KD step each on a shared batch of 128, SGD with momentum):
  loop, intra-op N  - one student after another, every op parallel over N intra-op threads (PyTorch's default)
  loop, intra-op 1  - the same on one thread
  worker threads    - one Python thread per core, one intra-op thread each, students dealt out (kdsweep's CPU path)
  torch.func.vmap   - the K students' weights stacked, one vmapped forward/backward (grouped convolutions)
Teacher (forward of the batch, no grad):
  intra-op N        - one call, ops parallel over N threads
  split batch       - the batch in one chunk per core, a worker thread each (kdsweep's CPU path)

Prints milliseconds per image-step, wall and CPU (this process), and the load average (other processes skew both).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from kdsweep.models.factory import build_model

B, SHAPE = 128, (3, 32, 32)
CL = torch.channels_last


def timed(fn, steps: int, per: int) -> tuple[float, float]:
    fn()  # warm-up: kernel selection, allocator
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    return 1000 * (time.perf_counter() - t0) / steps / per, 1000 * (time.process_time() - c0) / steps / per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--student", default="smallnet")
    ap.add_argument("--teacher", default="resnet18")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    k = args.k
    torch.manual_seed(0)
    x = torch.randn(B, *SHAPE).contiguous(memory_format=CL)
    y = torch.randint(10, (B,))
    t_logits = torch.randn(B, 10)

    def kd(s):
        return 0.7 * 16 * F.kl_div(F.log_softmax(s / 4, 1), F.log_softmax(t_logits / 4, 1), reduction="batchmean",
                                   log_target=True) + 0.3 * F.cross_entropy(s, y)

    nets = [build_model(args.student, SHAPE, 10).to(memory_format=CL) for _ in range(k)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4) for n in nets]

    def one(i):
        loss = kd(nets[i](x))
        opts[i].zero_grad(set_to_none=True)
        loss.backward()
        opts[i].step()

    pool = ThreadPoolExecutor(cores)

    def loop():
        for i in range(k):
            one(i)

    def threads():
        list(pool.map(lambda hand: [one(i) for i in hand], [range(j, k, cores) for j in range(cores)]))

    params, buffers = stack_module_state(nets)
    params = {n: p.detach().requires_grad_() for n, p in params.items()}
    base = copy.deepcopy(nets[0]).to("meta")
    vopt = torch.optim.SGD(params.values(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def vmapped():
        out = vmap(lambda p, b, xx: functional_call(base, (p, b), (xx,)), in_dims=(0, 0, None))(params, buffers, x)
        loss = sum(kd(out[i]) for i in range(k))
        vopt.zero_grad(set_to_none=True)
        loss.backward()
        vopt.step()

    teacher = build_model(args.teacher, SHAPE, 10).eval().requires_grad_(False).to(memory_format=CL)

    @torch.no_grad()
    def t_plain():
        teacher(x)

    @torch.no_grad()
    def t_run(chunk):
        return teacher(chunk)

    def t_split():
        torch.cat(list(pool.map(t_run, x.chunk(cores))))

    rows = []
    for name, fn, threads_, per in [
        (f"students: loop, intra-op {cores}", loop, cores, B * k),
        ("students: loop, intra-op 1", loop, 1, B * k),
        (f"students: {cores} worker threads x intra-op 1", threads, 1, B * k),
        (f"students: torch.func.vmap, intra-op {cores}", vmapped, cores, B * k),
        (f"teacher: one call, intra-op {cores}", t_plain, cores, B),
        (f"teacher: split batch, {cores} worker threads x intra-op 1", t_split, 1, B),
    ]:
        torch.set_num_threads(threads_)
        wall, cpu = timed(fn, args.steps, per)
        rows.append((name, wall, cpu))
    print(f"{args.student} x K={k} and {args.teacher}, batch {B}, channels_last, {cores} cores; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"  {'mechanism':<52} {'wall ms/img':>11} {'cpu ms/img':>11}")
    for name, wall, cpu in rows:
        print(f"  {name:<52} {wall:11.3f} {cpu:11.3f}")


if __name__ == "__main__":
    main()
