"""rkd's angle term, forward and backward: its gradient by hand in blocks against autograd's over the whole tensor,
and eager against torch.compile, in turn in one run.

    PYTHONPATH=. python benchmarks/rkd_angle.py [--batch 100] [--rounds 3] [--steps 30]

First, per member and step: `rkd_angle` in C (rkd._AngleKernel, where a C compiler builds it: one pass over the
distinct terms), in torch's ops by hand (rkd._AngleLoss: a block of anchors at a time, its gradient computed in the
same pass; $KDSWEEP_NATIVE=0) and as autograd differentiates it over the whole (B, B, B) tensor (the form kdsweep
used before 2026-12-06), alone and under vmap over 2 and 4 members, as a fused group's rkd members compute it.

Then torch.compile. The (B, B, B) angle term is most of rkd's cost a step on a CPU (benchmarks/loss_cost.py). A
compiled kernel would fuse its passes; this prints what compiling costs once (the first call) and then per call, with the process set up as a
CPU run is (devices.prepare_cpu: one thread, malloc keeping freed memory), and how far the compiled gradients are
from the eager ones: at --batch in float32, then, in float64, for both of rkd's terms at batches 16 and 64 on one and
on two intra-op threads, twice each (|compiled - eager| / |eager|, norms of the gradient with respect to the student's
embeddings), and whether eager's gradients pass torch.autograd.gradcheck. Single numbers per round: run it on a quiet machine (the load average is printed).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from _timing import ms_per_call

from kdsweep.common import native
from kdsweep.methods.rkd import _parts, in_c, rkd_angle, rkd_distance
from kdsweep.training.devices import prepare_cpu


def by_autograd(z_s, z_t, eps: float = 1e-12):
    """The angle term over the whole (B, B, B) tensor, differentiated by autograd."""
    def angles(z):
        g, h, u = _parts(z, eps)
        return ((g[None] - h[:, :, None] - h[:, None, :]) * u[:, :, None] * u[:, None, :]).clamp(-1, 1)

    return torch.nn.functional.smooth_l1_loss(angles(z_s), angles(z_t))


def hand_against_autograd(batch: int, rounds: int, steps: int) -> None:
    z_t = torch.randn(batch, 64)
    for members in (1, 2, 4):
        z0 = torch.randn(members, batch, 100)

        def step(fn):
            z = z0.clone().requires_grad_()
            loss = torch.func.vmap(lambda a: fn(a, z_t))(z) if members > 1 else fn(z[0], z_t)
            loss.sum().backward()

        ways = [("in C", rkd_angle), ("by hand", in_torch(rkd_angle)), ("autograd", by_autograd)]
        for r in range(rounds):
            took = {name: ms_per_call(lambda fn=fn: step(fn), steps) / members
                    for name, fn in (ways if r % 2 == 0 else ways[::-1])}
            print(f"{members} member(s){' under vmap' if members > 1 else ''}, round {r + 1}: in C "
                  f"{took['in C']:.2f} ms, by hand {took['by hand']:.2f} ms, autograd {took['autograd']:.2f} ms a "
                  f"member-step (by hand {took['by hand'] / took['in C']:.2f}x C's)", flush=True)


def in_torch(fn):
    """fn with rkd's C kernel turned off ($KDSWEEP_NATIVE=0) while it runs."""
    def call(*args):
        before = os.environ.get(native.ENV)
        os.environ[native.ENV] = "0"
        try:
            return fn(*args)
        finally:
            if before is None:
                del os.environ[native.ENV]
            else:
                os.environ[native.ENV] = before

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    prepare_cpu(1)
    torch.manual_seed(0)
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; batch {args.batch}; "
          f"the C kernel {'is' if in_c(torch.zeros(1)) else 'is NOT'} built here")
    hand_against_autograd(args.batch, args.rounds, args.steps)
    z_s, z_t = torch.randn(args.batch, 100), torch.randn(args.batch, 64)  # mlp100's and cnn1d's embedding widths

    def grad(fn) -> torch.Tensor:
        z = z_s.clone().requires_grad_()
        fn(z, z_t).backward()
        return z.grad

    compiled = torch.compile(rkd_angle)
    start = time.perf_counter()
    got = grad(compiled)
    took, eager = time.perf_counter() - start, grad(rkd_angle)
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; batch {args.batch}; the first compiled call "
          f"(compiling) took {took:.1f} s; compiled gradients against eager: max abs difference "
          f"{(got - eager).abs().max():.2e} (eager's largest entry {eager.abs().max():.2e})")
    for r in range(args.rounds):
        ways = [("eager", rkd_angle), ("compiled", compiled)]
        took = {name: ms_per_call(lambda fn=fn: grad(fn), args.steps) for name, fn in (ways if r % 2 == 0 else ways[::-1])}
        print(f"round {r + 1}: eager {took['eager']:.2f} ms, compiled {took['compiled']:.2f} ms a step "
              f"({took['eager'] / took['compiled']:.2f}x)", flush=True)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for fn in (rkd_distance, rkd_angle):
            for batch in (16, 64):
                torch._dynamo.reset()
                one = torch.compile(fn, dynamic=False)
                z_s, z_t = torch.randn(batch, 100, dtype=torch.float64), torch.randn(batch, 64, dtype=torch.float64)
                eager = grad(fn)
                far = [f"{((grad(one) - eager).norm() / eager.norm()).item():.1e}" for _ in range(2)]
                print(f"{fn.__name__} in float64, batch {batch}, {threads} thread(s): compiled gradients off by "
                      f"{' and '.join(far)} of eager's norm", flush=True)
    for fn in (rkd_distance, rkd_angle):  # eager is the right one: its gradients against finite differences
        z = torch.randn(16, 100, dtype=torch.float64, requires_grad=True)
        z_t = torch.randn(16, 64, dtype=torch.float64)
        print(f"{fn.__name__} eager, batch 16: torch.autograd.gradcheck passes: "
              f"{torch.autograd.gradcheck(lambda a, fn=fn: fn(a, z_t), (z,), raise_exception=False)}")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
