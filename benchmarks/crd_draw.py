"""crd's draw of negatives, as kdsweep computes it (32-bit words held in int64, on a CPU a block of rows at a time)
against one pass over all rows and the same hash computed in int32 words (unsigned multiplies, masked shifts):
the same ids, and which is faster on this machine; then a step's draw and counts as the counted loss takes them,
in torch's ops (draw_negatives, count_draws) and in C (counted_draws, crd_draw.c, where a C compiler builds it).

    python benchmarks/crd_draw.py [--rows 100] [--total 3600] [--threads 1]

Kept because the int32 form looks as if it should be about twice as fast (half the bytes, native 32-bit
multiplies) and, on the 2-core VM of docs/performance.md, was not: it needs masks after every shift and a
final widening, and PyTorch's CPU kernels do not shift uint32. What pays is fewer trips to memory: the hash
makes a dozen passes over its words, and a block of them stays in the core's cache between passes.
"""

from __future__ import annotations

import argparse
import os

import torch
from _timing import ms_per_call

from kdsweep.methods import crd

I32, U32 = torch.int32, torch.uint32


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of 32-bit words held in int32 (>> is arithmetic)."""
    return (x >> k) & ((1 << (32 - k)) - 1)


def _mix32_int32(x: torch.Tensor) -> torch.Tensor:
    """crd._mix32_ on int32 words: the multiplies through a uint32 view, whose overflow wraps by definition."""
    x ^= _shr(x, 16)
    x = x.view(U32).mul_(0x21F0AAAD).view(I32)
    x ^= _shr(x, 15)
    x = x.view(U32).mul_(0xD35A2D97).view(I32)
    x ^= _shr(x, 15)
    return x


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(I32)


def draw_int32(seed: int, step: torch.Tensor, words32: torch.Tensor, total: int) -> torch.Tensor:
    u = _mix32_int32(words32 ^ _as_int32(crd._key(seed, step)))
    return (u.to(torch.int64) & crd._MASK32).mul_(total) >> 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--total", type=int, default=3600)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    words = crd.position_words(args.rows, crd.NCE_K, torch.device("cpu"))
    words32, step = _as_int32(words), torch.zeros((), dtype=torch.long)
    for s in range(5):
        ids = crd.draw_negatives(7, step + s, words, args.total)
        assert torch.equal(ids, draw_int32(7, step + s, words32, args.total))
        assert torch.equal(ids, crd._ids(words, crd._key(7, step + s), args.total))
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {args.rows} x {crd.NCE_K} ids, the same "
          f"from every form; ms per draw on {args.threads} thread(s):")
    print(f"  int64 (kdsweep, {crd._CPU_BLOCK:,} words a block): "
          f"{ms_per_call(lambda: crd.draw_negatives(0, step.add_(1), words, args.total), args.steps):6.2f}")
    print(f"  int64, one pass over all:        "
          f"{ms_per_call(lambda: crd._ids(words, crd._key(0, step.add_(1)), args.total), args.steps):6.2f}")
    print(f"  int32, one pass over all:        "
          f"{ms_per_call(lambda: draw_int32(0, step.add_(1), words32, args.total), args.steps):6.2f}")
    if not crd.counts_in_c(torch.device("cpu"), args.rows, crd.NCE_K):
        print("draw and counts in C: the kernel is not built here (no C compiler?)")
        return
    at = [0]

    def in_c() -> None:
        at[0] += 1
        crd.counted_draws(0, at[0], args.rows, crd.NCE_K, args.total)

    def in_torch() -> None:
        crd.count_draws(crd.draw_negatives(0, step.add_(1), words, args.total), args.total)

    assert torch.equal(crd.counted_draws(7, 3, args.rows, crd.NCE_K, args.total),
                       crd.count_draws(crd.draw_negatives(7, torch.tensor(3), words, args.total), args.total))
    print(f"ms per draw and counts ({args.rows} x {args.total}), the same counts from both:")
    print(f"  torch's ops (int64, in blocks):  {ms_per_call(in_torch, args.steps):6.2f}")
    print(f"  C:                               {ms_per_call(in_c, args.steps):6.2f}")


if __name__ == "__main__":
    main()
