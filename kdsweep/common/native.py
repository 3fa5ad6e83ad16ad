"""Small C kernels for a CPU, compiled on first use with the machine's C compiler and loaded with ctypes.

Why: on a CPU a loss made of many tensor-wide passes is bound by memory and by the cost of each op, and a
loop that does the whole computation in one pass per element is several times faster (rkd's angle term:
docs/performance.md, "rkd's angle term in C"). Plain C with no Python or torch headers, so a build takes a
fraction of a second; a library is built once per source, compiler and CPU, in the cache folder
(`kdsweep.common.cache`), and loaded by every later process. `-march=native` makes it for this CPU, so the
file is named after the CPU's flags too: a cache folder shared between machines keeps one file per kind of CPU.

Where there is no compiler, the build fails, or $KDSWEEP_NATIVE is 0, `Kernel.library()` is None and the
caller computes the same function with torch's ops; a failure is said once per process, in one line on stderr
(KDSWEEP_NATIVE=0 says nothing).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from kdsweep.common.cache import cache_dir

ENV = "KDSWEEP_NATIVE"  # 0: never build or load a kernel (torch's ops everywhere)
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp-simd", "-shared", "-fPIC"]
# -ffp-contract=off: no fused multiply-adds but those written as fmaf, so each product is rounded as torch's ops round it;
# -fno-math-errno: sqrtf need not set errno, so a loop calling it vectorises (its value is the same);
# -fopenmp-simd: the loops' `omp simd` reductions vectorise without -ffast-math (no OpenMP runtime is linked).


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip() != "0"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86, ARM
                return line
    except OSError:
        pass
    return os.uname().machine


@functools.cache
def _build_id(cc: str) -> str:
    """What a library's file depends on besides its source: compiler, its version, flags and CPU (asked once a
    process, not once a kernel)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    return "\0".join([cc, version, " ".join(FLAGS), _cpu_flags()])


class Kernel:
    """The C file `source`, built and loaded on first use; `signatures`: function name -> (restype, argtypes)."""

    def __init__(self, source: Path, signatures: dict[str, tuple]):
        self.source, self.signatures = source, signatures
        self._lib: ctypes.CDLL | None = None
        self._tried = False
        self._lock = threading.Lock()

    def library(self) -> ctypes.CDLL | None:
        """The loaded library, or None where it cannot be had (a failure said once, on stderr)."""
        if not enabled():
            return None
        if self._tried:
            return self._lib
        with self._lock:
            if not self._tried:
                try:
                    self._lib = self._load()
                except (OSError, subprocess.SubprocessError, RuntimeError) as e:
                    print(f"warning: {self.source.name} not built ({e}): that part of the loss runs in torch's ops, "
                          f"several times slower on a CPU (install gcc or clang, or set CC; {ENV}=0 to not try)",
                          file=sys.stderr, flush=True)
                self._tried = True
        return self._lib

    def usable_for(self, device: torch.device) -> bool:
        """Whether a caller on `device` may call the kernel: on a CPU, not while torch.compile or make_fx traces the
        caller (a C call is not an operation they can record), and where the kernel builds."""
        return (device.type == "cpu" and not torch.compiler.is_compiling()
                and not torch._C._len_torch_dispatch_stack() and self.library() is not None)

    def _load(self) -> ctypes.CDLL:
        cc = _compiler()
        if cc is None:
            raise RuntimeError("no C compiler: set CC, or install gcc or clang")
        key = hashlib.sha256(b"\0".join([self.source.read_bytes(), _build_id(cc).encode()])).hexdigest()[:16]
        folder = cache_dir() / "native"
        path = folder / f"{self.source.stem}-{key}.so"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)  # each builder its own file, then one rename
            os.close(fd)
            try:
                done = subprocess.run([cc, *FLAGS, str(self.source), "-o", tmp], capture_output=True, text=True,
                                      timeout=120)
                if done.returncode:
                    raise RuntimeError(f"{Path(cc).name} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(str(path))  # a CDLL call releases the GIL: other worker threads run meanwhile
        for name, (restype, argtypes) in self.signatures.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        return lib
