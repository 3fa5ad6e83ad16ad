"""The first-GPU suite: per-trial seconds, GPU utilisation and the fraction of the FLOP floor, at K = 1, 8, 32.

`benchmarks/gpu.sh` runs it after the CUDA tests. Each K trains K vanilla-KD students (seed 003's
ResNet-18 -> SmallNet, random teacher weights: a speed test) in one lockstep group over the same
synthetic CIFAR-shaped images, with kdsweep's own trainer and teacher cache, as a study would.

The floor is the work counted in multiply-accumulates (teacher forward once per batch, each
student's forward + backward = 3 forwards, each student's validation pass), at the bf16 matmul
throughput measured on this GPU in this run: a reference from the same machine and minute, not a
datasheet number. `fraction of floor` = floor seconds / measured seconds; 1.0 would be a GPU that
does nothing but large matmuls.

`--dry-run` runs the same code on the CPU with tiny sizes, so CI proves the suite works; its numbers
mean nothing about a GPU and it says so.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

import torch

from kdsweep.data.builtin import Augment, RawData, make_synthetic
from kdsweep.data.device_data import DeviceData
from kdsweep.methods.registry import get_method
from kdsweep.models.cost import count_macs
from kdsweep.models.factory import build_model
from kdsweep.training.devices import Accel
from kdsweep.training.loop import Lockstep, Member, Schedule
from kdsweep.training.teacher_outputs import TeacherCache, default_budget_bytes

CLASSES = 10
IN_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class Sizes:
    images: int  # training images (the validation split is a tenth more)
    epochs: int
    runs: tuple[tuple[int, bool | None], ...]  # (K, fused: None = the default for the device)
    batch: int = 128


# K = 8 also without fusion: the default on CUDA (fused) against the worker-free serial path it replaced.
FULL = Sizes(45_000, 10, ((1, None), (8, None), (8, False), (32, None)))
DRY = Sizes(256, 1, ((1, None), (2, True), (2, False)), batch=64)


class Utilisation:
    """GPU utilisation sampled by nvidia-smi every 100 ms while a run lasts (None where it cannot be read)."""

    def __init__(self, device: torch.device):
        self.samples: list[float] = []
        self.proc = None
        smi = shutil.which("nvidia-smi") if device.type == "cuda" else None
        if smi:
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.proc = subprocess.Popen([smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          f"--id={index}", "-lms", "100"], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass

    def stop(self) -> float | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        self.proc.wait()
        return sum(self.samples) / len(self.samples) if self.samples else None


def matmul_flops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """Measured FLOP/s of a large matmul at the training precision (bf16 on CUDA, fp32 on CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type != "cuda":
        n, repeats = 1024, 3
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _data(sizes: Sizes, device: torch.device) -> DeviceData:
    n_val = sizes.images // 9  # 10% of train + val
    x, y = make_synthetic(sizes.images + n_val + 256, seed=0)
    raw = RawData(x[:-256], y[:-256], x[-256:], y[-256:], (0.5,) * 3, (0.25,) * 3, CLASSES, Augment(pad=4, flip=True))
    return DeviceData(raw, 0, n_val / (sizes.images + n_val), device)


def run_k(k: int, sizes: Sizes, data: DeviceData, teacher, device: torch.device, fused: bool | None = None) -> dict:
    """K trials in one lockstep group, timed from the first step to the last epoch's evaluation."""
    method = get_method("vanilla_kd")
    members = []
    for i in range(k):
        torch.manual_seed(1)
        student = build_model("smallnet", IN_SHAPE, CLASSES)
        hp = {"temperature": 4.0, "alpha": 0.7}
        lr = 0.05 * 2 ** (i / max(1, k - 1) - 0.5)
        members.append(Member(student, method(hp, student.shapes(IN_SHAPE), teacher.shapes(IN_SHAPE), sizes.epochs),
                              Schedule(sizes.epochs, sizes.batch, lr)))
    group = Lockstep(members, teacher, data, cache=TeacherCache(default_budget_bytes(device)),
                     accel=Accel(fused=fused))
    _sync(device)
    util = Utilisation(device)
    t0 = time.perf_counter()
    while group.epoch():
        pass
    _sync(device)
    wall = time.perf_counter() - t0
    return {"k": k, "wall": wall, "util": util.stop(), "complete": sum(r.result.stopped_by is None for r in group.runs),
            "fused": group.fused_members}


def floor_seconds(k: int, sizes: Sizes, data: DeviceData, t_macs: int, s_macs: int, flops: float) -> float:
    steps = data.steps_per_epoch(sizes.batch) * sizes.batch
    macs = sizes.epochs * (steps * (t_macs + 3 * k * s_macs) + len(data.val_y) * k * s_macs)
    return 2 * macs / flops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdsweep.tools.gpu_suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: proves the suite runs, measures nothing")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("kdsweep: error: no CUDA device; use --dry-run to check the suite on the CPU")
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda":
        from kdsweep.training.devices import resolve_device

        resolve_device("cuda")  # cuDNN autotuning, as a study has it
    sizes = DRY if args.dry_run else FULL
    data = _data(sizes, device)
    torch.manual_seed(0)
    teacher = build_model("resnet18", IN_SHAPE, CLASSES).to(device).eval().requires_grad_(False)
    t_macs = count_macs(teacher, IN_SHAPE)
    s_macs = count_macs(build_model("smallnet", IN_SHAPE, CLASSES), IN_SHAPE)
    flops = matmul_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run: these numbers say nothing about a GPU)"
    print(f"kdsweep GPU suite on {name}, torch {torch.__version__}")
    print(f"  {data.n_train} training images x {sizes.epochs} epochs, batch {sizes.batch}, resnet18 -> smallnet, vanilla_kd; "
          f"T = {t_macs / 1e6:.0f} M MAC/image, S = {s_macs / 1e6:.1f} M MAC/image; "
          f"measured matmul peak {flops / 1e12:.1f} TFLOP/s")
    for fuse in (False, True):  # warm-up of both paths
        run_k(2, DRY, _data(DRY, device), teacher, device, fuse)
    print(f"  {'K':>3} {'path':>7} {'wall s':>8} {'s/trial':>8} {'GPU util %':>10} {'floor s':>8} {'of floor':>8}")
    rows = []
    for k, fuse in sizes.runs:
        r = run_k(k, sizes, data, teacher, device, fuse)
        floor = floor_seconds(k, sizes, data, t_macs, s_macs, flops)
        util = "n/a" if r["util"] is None else f"{r['util']:.0f}"
        path = "fused" if r["fused"] else "serial"
        print(f"  {k:>3} {path:>7} {r['wall']:8.1f} {r['wall'] / k:8.2f} {util:>10} {floor:8.2f} {floor / r['wall']:8.3f}",
              flush=True)
        rows.append(r)
    if any(r["complete"] != r["k"] for r in rows):
        print("kdsweep: error: some trials stopped early (diverged): the timings are not of full trials")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
