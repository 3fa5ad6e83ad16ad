"""A CPU run tells glibc's malloc to keep freed memory (devices.keep_freed_memory): a step's large temporaries,
freed and allocated again every step, then reuse pages the process already has instead of faulting in new ones."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from types import SimpleNamespace

import pytest

from kdsweep.common import native
from kdsweep.training.devices import sets_allocator

# Steps as a lockstep group's worker thread takes them: rkd's angle term, forward and backward, at B = 100, in
# torch's ops (KDSWEEP_NATIVE=0: its C kernel allocates no (B, B, B) temporaries, kdsweep/common/native.py).
STEPS = """
import resource, sys, torch
from concurrent.futures import ThreadPoolExecutor
from kdsweep.methods.rkd import rkd_angle
from kdsweep.training.devices import keep_freed_memory, prepare_cpu
if sys.argv[1] == "prepared":
    prepare_cpu(1)
    assert keep_freed_memory()

z_t = torch.randn(100, 64)

def steps(n):
    for _ in range(n):
        rkd_angle(torch.randn(100, 100, requires_grad=True), z_t).backward()

pool = ThreadPoolExecutor(1)
pool.submit(steps, 3).result()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
pool.submit(steps, 20).result()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def _faults_a_step(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not sets_allocator(k)} | {native.ENV: "0"}
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_prepared_cpu_process_reuses_the_memory_its_steps_free():
    # A step's (100, 100, 100) temporaries are 1,000 pages each: by default many are faulted in anew every step.
    default, prepared = _faults_a_step("default"), _faults_a_step("prepared")
    if default < 1000:
        pytest.skip(f"this glibc faulted only {default} pages a step by default: nothing to tell apart")
    assert prepared < default / 4, (prepared, default)


def test_a_user_choice_of_allocator_is_left_alone(monkeypatch):
    from kdsweep.training import devices

    calls = []
    monkeypatch.setattr(devices, "_kept", None)
    monkeypatch.setattr(devices, "ctypes", SimpleNamespace(CDLL=lambda *_: calls.append(1)))
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert devices.keep_freed_memory() is False
    assert calls == []
