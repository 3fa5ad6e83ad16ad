"""Where and how training runs: the device chosen, autocast and memory format (Accel), CPU threads and
the thread pools that step lockstep students side by side.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from kdsweep.common.errors import UserError
from kdsweep.common.processes import cpu_share


@dataclass(frozen=True)
class Accel:
    """How models run on the device: memory format and compilation (bf16 autocast is always on for CUDA)."""

    channels_last: bool = True  # conv models and their inputs in NHWC: faster with cuDNN and oneDNN alike
    compile: bool = False  # torch.compile, once per architecture per process
    # CPU lockstep groups: one worker thread per core, each with one intra-op thread, owning a share of
    # the students (and of each teacher batch). None: the usable cores; 0 or 1: off (intra-op threads only).
    cpu_workers: int | None = None
    # Lockstep members stacked into one vmapped model with one fused optimiser step (kdsweep/fused.py).
    # None: on for CUDA groups of K >= 2; on CPU, measured per student architecture and group size on the
    # group's first batch (worker threads win for convolutions there, fusing for small MLPs); True/False: forced.
    fused: bool | None = None

    def tag(self, device: torch.device) -> str:
        dtype = "bf16" if device.type == "cuda" else "fp32"
        return f"{device.type}|{dtype}|{'nhwc' if self.channels_last else 'nchw'}|{'compiled' if self.compile else 'eager'}"


def autocast(device: torch.device):
    # bf16 on CUDA: no loss scaler needed, tensor cores used; fp32 on CPU.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def frozen_copy(teacher: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen network's inference copy with its weights in `dtype`, cast once.

    Under autocast an fp32 network's weights are cast to bf16 again at every forward pass: for a
    frozen teacher that is a copy of all its weights per batch, for nothing.
    """
    if next(teacher.parameters()).dtype == dtype:
        return teacher
    return copy.deepcopy(teacher).to(dtype).eval().requires_grad_(False)


def teacher_dtype(device: torch.device) -> torch.dtype:
    """What a frozen teacher's weights are held in: bf16 on CUDA (what autocast computes in), fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def prepare_cpu(threads: int | None = None, default: int | None = None) -> int:
    """Set up this process for a CPU run and return its intra-op threads: `threads`, else $OMP_NUM_THREADS,
    else `default` (a dataset's DatasetSpec.cpu_threads), else the cores this process may use; the last two
    at most its share of them when it is one of a --processes command's workers. Also tells glibc's allocator
    to keep freed memory (`keep_freed_memory`).

    Called before a command's first torch op (its pair check builds both models): two workers that each
    start with torch's default of every core spin their idle threads against each other's work, which made
    a 2-core machine's sweep pair checks 1.8 s instead of under 0.1 (docs/performance.md, "Workers' threads")."""
    keep_freed_memory()
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() and int(env) > 0 else min(default or cpu_share(), cpu_share())
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


# mallopt(param, value) for glibc's malloc (param numbers from malloc.h)
_KEEP = (
    (-8, 1),  # M_ARENA_MAX: worker threads share the main heap (a thread's own heaps are unmapped when emptied)
    (-3, 32 << 20),  # M_MMAP_THRESHOLD: blocks under 32 MB come from the heap, not from an mmap of their own
    (-1, 1 << 30),  # M_TRIM_THRESHOLD: up to 1 GB of freed heap kept for the next step
    (-2, 64 << 20),  # M_TOP_PAD: the heap grows by 64 MB at a time
)
_kept: bool | None = None  # None: not tried in this process


def sets_allocator(name: str) -> bool:
    """Whether the environment variable `name` is a user's choice of allocator, which kdsweep then leaves alone."""
    return name.startswith("MALLOC_") or name in ("GLIBC_TUNABLES", "LD_PRELOAD")


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to reuse the memory a step frees instead of handing it back to the kernel; True if set.

    A CPU step allocates and frees the same large tensors every step (rkd's (B, B, B) angles: 4 MB each at
    B = 100). By default glibc serves such a block from an mmap of its own, or from a worker thread's heap that
    it unmaps once empty, so steps keep touching new pages: a sweep of every MNIST-1D method, 60 epochs each,
    took 3-7 million page faults and 6-14 s of kernel time, and ran 6-13% slower than with these settings
    (docs/performance.md, "The allocator"). The cost: a process holds its peak memory until it exits. Left
    alone where the user chose (any MALLOC_* or GLIBC_TUNABLES variable, or an LD_PRELOADed allocator) and off
    glibc. Once per process, before the worker threads start."""
    global _kept
    if _kept is None:
        _kept = False
        if not any(map(sets_allocator, os.environ)) and platform.libc_ver()[0] == "glibc":
            mallopt = ctypes.CDLL(None).mallopt
            _kept = all(mallopt(param, value) == 1 for param, value in _KEEP)
    return _kept


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="kdsweep-cpu")
    return _POOLS[workers]


def _cpu_workers(accel: Accel, device: torch.device, members: int, teacher: bool) -> int:
    """Worker threads of a lockstep group on CPU (1: none, the plain loop with intra-op threads)."""
    if device.type != "cpu" or accel.compile or not (members >= 2 or teacher):
        return 1
    n = cpu_share() if accel.cpu_workers is None else accel.cpu_workers
    return max(1, n)


def _fuse_min(accel: Accel, device: torch.device, members: int) -> int | None:
    """The fewest members worth fusing into one group (None: no fusion); see kdsweep/fused.py."""
    if accel.fused is None:  # on CPU the group measures whether fusing pays (loop.Lockstep._fusing_pays)
        return 2 if device.type in ("cuda", "cpu") and members >= 2 else None
    return 1 if accel.fused else None


@contextlib.contextmanager
def _intra_op_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _in_pool(workers: int, fn: Callable, items: Sequence) -> list:
    """fn over items on the worker threads, each with one intra-op thread (set before a worker's first op)."""
    with _intra_op_threads(1):
        return list(_pool(workers).map(fn, items))


def _deal(items: Sequence, n: int, cost: Callable[[Any], float] | None = None) -> list[list]:
    """Items dealt into at most n non-empty hands, each hand in the items' order: round-robin, or, given each
    item's cost, the costliest first, each to the hand that costs least so far (ties: the smaller hand). Hands
    that step side by side each wait for the slowest, and a lockstep group's members differ in cost by 100x
    (crd against ce on MNIST-1D); items of equal cost are still dealt in turn."""
    if cost is None:
        return [list(items[i::n]) for i in range(min(n, len(items)))]
    costs = [cost(item) for item in items]
    hands: list[list[int]] = [[] for _ in range(min(n, len(items)))]
    totals = [0.0] * len(hands)
    for i in sorted(range(len(items)), key=lambda i: -costs[i]):
        h = min(range(len(hands)), key=lambda j: (totals[j], len(hands[j])))
        hands[h].append(i)
        totals[h] += costs[i]
    return [[items[i] for i in sorted(hand)] for hand in hands if hand]


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available (use --device cpu or auto)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        # Every trial runs the same few shapes thousands of times: cuDNN's one-off search for the
        # fastest kernel per shape pays for itself within the first epoch.
        torch.backends.cudnn.benchmark = True
    return torch.device(name)
