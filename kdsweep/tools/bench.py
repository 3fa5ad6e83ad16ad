"""`kdsweep bench`: a seed-style reference trial against kdsweep's own path, same data and models, one process.

Three timed runs, in this order, each on the same training split, teacher
weights and student initialisation:

  1. reference trial - as seed 003 trains vanilla KD: per-sample torchvision
     transforms (RandomCrop, RandomHorizontalFlip, ToTensor, Normalize) on PIL
     images in DataLoader workers, the teacher's forward pass at every step,
     `.item()` per step, a val pass per epoch; at kdsweep's precision (bf16
     autocast on CUDA, fp32 on CPU), so both do the same arithmetic;
  2. kdsweep trial - one trial through kdsweep's trainer with the teacher
     cache off: device-resident uint8 data, batched augmentation, channels_last
     (bf16 autocast on CUDA), one host sync per epoch;
  3. kdsweep study - K trials through the same trainer in lockstep with a fresh
     teacher cache: one data pass and one teacher output per batch for all K.

Every reference trial does identical work, so the wall time of K reference
trials is K times the measured one (`--ref-trials` measures more and averages).
The bound is what sharing the teacher alone can give when the work is
FLOP-bound: K(T+S)/(T+KS), T the teacher's forward MACs per image, S three
times the student's (forward + backward), both from `profile.count_macs`.
"""

from __future__ import annotations

import copy
import os
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from kdsweep.common import collector
from kdsweep.common.errors import UserError
from kdsweep.common.processes import cores
from kdsweep.common.torchvision_import import torchvision
from kdsweep.data.builtin import RawData, default_data_dir
from kdsweep.data.device_data import DeviceData
from kdsweep.data.dispatch import get_dataset
from kdsweep.methods.registry import get_method
from kdsweep.models.cost import count_macs
from kdsweep.models.factory import build_model, check_arch
from kdsweep.training.devices import (
    Accel,
    autocast,
    frozen_copy,
    prepare_cpu,
    teacher_dtype,
)
from kdsweep.training.loop import Lockstep, Member, Schedule
from kdsweep.training.teacher_outputs import TeacherCache, default_budget_bytes

SEED_PAIR = ("resnet18", "smallnet")  # seed 003: CIFAR ResNet-18 -> SmallNet
VAL_FRACTION = 0.1


@dataclass
class BenchConfig:
    dataset: str = "synthetic"
    data_dir: str | None = None
    images: int = 1024  # training images per epoch
    epochs: int = 3
    trials: int = 8  # K
    batch_size: int = 128
    teacher: str = SEED_PAIR[0]
    student: str = SEED_PAIR[1]
    device: str = "auto"
    workers: int | None = None  # reference DataLoader workers (default: sized to the cores)
    threads: int | None = None  # CPU intra-op threads (default: the cores this process may use)
    ref_trials: int = 1
    parallel: int | None = None  # lockstep group size in the study (default: all K at once)
    teacher_cache_mb: float | None = None
    lr: float = 0.05
    seed: int = 0

    def check(self) -> None:
        get_dataset(self.dataset)
        check_arch(self.teacher)
        check_arch(self.student)
        for name in ("images", "epochs", "trials", "batch_size", "ref_trials"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.images < self.batch_size:
            raise UserError(f"--images ({self.images}) must be at least --batch-size ({self.batch_size})")
        if self.parallel is not None and not 1 <= self.parallel:
            raise UserError(f"--parallel must be at least 1, got {self.parallel}")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}")


def study_bound(t_macs: float, s_macs: float, k: int) -> float:
    """Study speedup from computing the teacher once for K trials, if time is proportional to MACs."""
    return k * (t_macs + s_macs) / (t_macs + k * s_macs)


def default_workers(device: torch.device) -> int:
    """DataLoader workers for the reference: the fastest choice, so the baseline is not handicapped.

    Seed 003 uses 4 workers to keep a GPU fed. On CPU the training already uses
    every core, and a worker process only competes with the intra-op threads
    (measured on 2 cores: 1 worker made the reference 2.5x slower than 0), so
    the transforms run inline there.
    """
    if device.type == "cpu":
        return 0
    return min(4, max(1, cores() - 1))


# ---------------------------------------------------------------------------------------------- measuring


class Phase:
    """One benchmarked path, run in segments (an epoch each): wall and CPU time summed, peak memory over them.

    CPU time is this process's plus its finished children's (DataLoader workers).
    Peak memory: on CUDA the allocator's peak; on CPU the resident set of the
    process and its children, sampled every 20 ms.
    """

    def __init__(self, name: str, device: torch.device, steps, notes: list[str] | None = None):
        self.name, self.device, self.steps = name, device, steps
        self.wall = self.cpu = self.peak_mb = 0.0
        self.images = 0
        self.notes = [] if notes is None else notes  # what its lockstep groups chose (fused or threads; measured?)

    def run_segment(self) -> bool:
        """Run the path's next epoch; False when it has finished."""
        stop = threading.Event()
        sampler = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/statm"):
            self.peak_mb = max(self.peak_mb, _rss_mb())

            def sample():
                children, i = 0.0, 0
                while not stop.wait(0.05):
                    if i % 40 == 20:  # every 2 s, first after 1 s (workers have started by then)
                        children = _children_private_mb()
                    i += 1
                    self.peak_mb = max(self.peak_mb, _rss_mb() + children)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
        cpu0, t0 = time.process_time() + _children_cpu(), time.perf_counter()
        try:
            self.images += next(self.steps)
            more = True
        except StopIteration:
            more = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = max(self.peak_mb, torch.cuda.max_memory_allocated(self.device) / 2**20)
        self.wall += time.perf_counter() - t0
        self.cpu += time.process_time() + _children_cpu() - cpu0
        if sampler is not None:
            stop.set()
            sampler.join()
        return more

    @property
    def rate(self) -> float:
        return self.images / self.wall


def _rss_mb() -> float:
    """Resident set of this process (cheap: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _children_private_mb() -> float:
    """Private (unshared) memory of this process's children, e.g. DataLoader workers: what they add.

    Reading smaps_rollup walks the page tables (~20 ms for a 2 GB process), so it is sampled rarely.
    """
    kb = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    kb += sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))
            except (OSError, ValueError, IndexError):
                pass
    return kb / 1024


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------------------------- the data


def _load(cfg: BenchConfig, device: torch.device) -> tuple[RawData, DeviceData]:
    """Load (or generate) enough data that the training split holds exactly cfg.images images."""
    spec = get_dataset(cfg.dataset)
    n = cfg.images
    while n - max(1, int(round(VAL_FRACTION * n))) < cfg.images:
        n += 1
    raw = spec.load(Path(cfg.data_dir) if cfg.data_dir else default_data_dir(), n)
    if raw.train_x.dim() != 4:  # the reference hands each sample to torchvision's transforms as a PIL image
        shape = "x".join(map(str, raw.train_x.shape[1:]))
        raise UserError(f"kdsweep bench times image pipelines; {cfg.dataset}'s samples are {shape} signals, not images "
                        f"(use --dataset synthetic, digits or an image dataset)")
    data = DeviceData(raw, cfg.seed, VAL_FRACTION, device)
    if data.n_train < cfg.images:
        raise UserError(f"{cfg.dataset} has only {data.n_train} training images after the val split; lower --images")
    return raw, data


class _PILImages(torch.utils.data.Dataset):
    """Images as a torchvision dataset serves them: a PIL image per sample, transformed in the worker."""

    def __init__(self, x_u8: torch.Tensor, y: torch.Tensor, transform):
        self.x = x_u8.cpu().permute(0, 2, 3, 1).numpy()  # (N, H, W, C), as torchvision's CIFAR10.data
        self.y = y.cpu().tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image

        img = self.x[i]
        img = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        return self.transform(img), self.y[i]


def _loaders(raw: RawData, data: DeviceData, cfg: BenchConfig, workers: int):
    T = torchvision().transforms

    h = data.in_shape[1]
    aug = ([T.RandomCrop(h, padding=data.augment.pad)] if data.augment.pad else []) + \
          ([T.RandomHorizontalFlip()] if data.augment.flip else [])
    norm = [T.ToTensor(), T.Normalize(raw.mean, raw.std)]
    train = _PILImages(data.train_x, data.train_y, T.Compose(aug + norm))
    val = _PILImages(data.val_x, data.val_y, T.Compose(norm))
    pin = data.device.type == "cuda"
    dl = torch.utils.data.DataLoader
    return (dl(train, batch_size=cfg.batch_size, shuffle=True, num_workers=workers, pin_memory=pin),
            dl(val, batch_size=cfg.batch_size, shuffle=False, num_workers=workers, pin_memory=pin))


# ---------------------------------------------------------------------------------------------- reference


def _kd_loss_seed(logits_s, logits_t, y, T=4.0, alpha=0.7):
    """Seed 003's kd_loss_vanilla."""
    ce = F.cross_entropy(logits_s, y)
    p_s = F.log_softmax(logits_s / T, dim=1)
    p_t = F.softmax(logits_t / T, dim=1)
    kd = F.kl_div(p_s, p_t, reduction="batchmean") * (T * T)
    return alpha * kd + (1 - alpha) * ce


@torch.no_grad()
def _evaluate_seed(model, loader, device) -> float:
    model.eval()
    correct, total = 0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device):
            correct += (model(x).argmax(1) == y).sum().item()
        total += y.size(0)
    return correct / total


def reference_trial(student, teacher, train_loader, val_loader, device: torch.device, epochs: int, lr: float) -> Iterator[int]:
    """Seed 003's vanilla-KD training loop (teacher forward every step); yields the images trained in each epoch.

    On CUDA it computes in bf16 autocast, teacher included, as kdsweep does (the seed's fp16 and
    grad scaler would be other work, not the same work done another way).
    """
    teacher.eval()
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    best_val = 0.0
    for _ in range(epochs):
        student.train()
        correct, images = 0, 0
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device):
                with torch.no_grad():
                    logits_t = teacher(x)
                logits_s = student(x)
                loss = _kd_loss_seed(logits_s, logits_t, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += (logits_s.argmax(1) == y).sum().item()
            images += y.size(0)
        sched.step()
        val = _evaluate_seed(student, val_loader, device)
        if val > best_val:
            best_val, best_state = val, copy.deepcopy(student.state_dict())  # noqa: F841 (the seed keeps it)
        yield images


# ---------------------------------------------------------------------------------------------- the bench


def _warm_up(teacher, student, data: DeviceData, batch: int) -> None:
    """Untimed steps of each model in both memory formats (the reference's NCHW, kdsweep's NHWC), at the precision
    the runs use, teacher also as kdsweep holds it: one-off kernel setup and cuDNN's autotuning are nobody's cost."""
    x = next(iter(data.eval_batches("train")))[0][:batch]
    y = data.train_y[: len(x)]
    device = x.device
    for fmt in (torch.contiguous_format, torch.channels_last):
        t, s = copy.deepcopy(teacher).to(memory_format=fmt), copy.deepcopy(student).to(memory_format=fmt)
        xx = x.contiguous(memory_format=fmt)
        for net in (t, frozen_copy(t, teacher_dtype(device))):  # the reference's teacher, and kdsweep's
            with torch.no_grad(), autocast(device):
                net(xx)
        for _ in range(2):  # cuDNN benchmarks a shape on its first call; the second runs what it chose
            with autocast(device):
                loss = F.cross_entropy(s(xx), y)
            loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(cfg: BenchConfig, say: Callable[[str], None] = print) -> dict:
    from kdsweep.training.devices import resolve_device

    cfg.check()
    device = resolve_device(cfg.device)
    threads = prepare_cpu(cfg.threads) if device.type == "cpu" else None
    workers = default_workers(device) if cfg.workers is None else cfg.workers
    raw, data = _load(cfg, device)
    k, e, b = cfg.trials, cfg.epochs, cfg.batch_size

    torch.manual_seed(cfg.seed)
    teacher = build_model(cfg.teacher, data.in_shape, data.num_classes).to(device).eval().requires_grad_(False)
    new_student = _student_factory(cfg, data, device)
    t_macs = count_macs(teacher, data.in_shape)
    s_macs = 3 * count_macs(new_student(), data.in_shape)
    bound = study_bound(t_macs, s_macs, k)
    where = f"{device.type}" + (f", {threads} threads" if threads else f" ({torch.cuda.get_device_name(device)})")
    say(f"kdsweep bench: {cfg.dataset}, {cfg.teacher} -> {cfg.student} (teacher weights random: a speed test only), "
        f"{data.n_train} training images x {e} epochs, batch {b}, {where}, K={k}")
    say(f"  T = {t_macs / 1e6:.1f} M MAC/image (teacher forward), S = 3 x {s_macs / 3e6:.1f} M MAC/image "
        f"(student forward + backward); load average before: {_load_avg()}")
    _warm_up(teacher, new_student(), data, b)
    # The phases compare training, the reference's (and its DataLoader workers', forked from here) and kdsweep's: both
    # with the collector on, start-up's objects frozen (common/collector.py), not the reference with it paused.
    collector.resume()
    if device.type == "cpu":
        say(f"  resident memory before the runs: {_rss_mb():.0f} MB")
    ref, one, study, cache = _run_phases(cfg, device, teacher, new_student, raw, data, workers)
    out = _say_results(cfg, data, ref, one, study, cache, bound, say)
    return {**out, "bound": bound, "t_macs": t_macs, "s_macs": s_macs}


def _student_factory(cfg: BenchConfig, data: DeviceData, device: torch.device) -> Callable[[], torch.nn.Module]:
    def new_student():
        torch.manual_seed(cfg.seed + 1)  # every trial, on both paths, starts from the same weights
        return build_model(cfg.student, data.in_shape, data.num_classes).to(device)

    return new_student


def _kdsweep_epochs(cfg: BenchConfig, teacher, new_student, data: DeviceData, lrs: list[float],
                    cache: TeacherCache | None, parallel: int, notes: list[str]) -> Iterator[int]:
    """kdsweep's path, an epoch per step: lockstep groups of `parallel` vanilla-KD trials, one after the other;
    each group's notes are added to `notes`."""
    e, b = cfg.epochs, cfg.batch_size
    method_cls = get_method("vanilla_kd")
    hp = {"temperature": 4.0, "alpha": 0.7}
    t = copy.deepcopy(teacher)
    for g in range(0, len(lrs), parallel):
        members = []
        for lr in lrs[g : g + parallel]:
            student = new_student()
            method = method_cls(hp, student.shapes(data.in_shape), teacher.shapes(data.in_shape), e)
            members.append(Member(student, method, Schedule(e, b, lr)))
        group = Lockstep(members, t, data, cache=cache, accel=Accel())
        while not group.done:
            live = sum(r.alive for r in group.runs)
            group.epoch()
            yield live * data.steps_per_epoch(b) * b
        notes += group.notes


def _run_phases(cfg: BenchConfig, device: torch.device, teacher, new_student, raw: RawData, data: DeviceData,
                workers: int) -> tuple[Phase, Phase, Phase, TeacherCache]:
    """The three timed paths, an epoch of each in turn; the reference averaged over its `--ref-trials` runs."""
    k, e = cfg.trials, cfg.epochs
    train_loader, val_loader = _loaders(raw, data, cfg, workers)
    refs = [Phase(f"reference trial (seed 003 style, {workers} DataLoader worker{'s' * (workers != 1)})", device,
                  reference_trial(new_student(), copy.deepcopy(teacher), train_loader, val_loader, device, e, cfg.lr))
            for _ in range(cfg.ref_trials)]
    one = Phase("kdsweep trial (device data path, no cache)", device,
                _kdsweep_epochs(cfg, teacher, new_student, data, [cfg.lr], None, 1, []))
    budget = default_budget_bytes(device) if cfg.teacher_cache_mb is None else int(cfg.teacher_cache_mb * 2**20)
    cache = TeacherCache(budget)  # fresh: filling it is part of the study's time
    lrs = [cfg.lr * 2 ** (i / max(1, k - 1) - 0.5) for i in range(k)]  # x0.7 .. x1.4 of --lr: no trial diverges
    group = cfg.parallel or k
    how = f"lockstep x{group} + teacher cache" if group > 1 else "sequential + teacher cache"
    notes: list[str] = []
    study = Phase(f"kdsweep study, K={k} ({how})", device,
                  _kdsweep_epochs(cfg, teacher, new_student, data, lrs, cache, group, notes), notes)
    # Round-robin, an epoch of each path in turn: on a shared machine every path sees the same load on average.
    pending = [*refs, one, study]
    while pending:
        pending = [p for p in pending if p.run_segment()]
    ref = Phase(refs[0].name, device, iter(()))
    ref.wall, ref.cpu = (sum(getattr(r, a) for r in refs) / len(refs) for a in ("wall", "cpu"))
    ref.images, ref.peak_mb = refs[0].images, max(r.peak_mb for r in refs)
    return ref, one, study, cache


def _say_results(cfg: BenchConfig, data: DeviceData, ref: Phase, one: Phase, study: Phase, cache: TeacherCache,
                 bound: float, say: Callable[[str], None]) -> dict:
    """The table and the speedups; returns what run_bench reports besides the MACs and the bound."""
    k, e, b = cfg.trials, cfg.epochs, cfg.batch_size
    group = cfg.parallel or k
    phases = [ref, one, study]
    full = study.images // (e * data.steps_per_epoch(b) * b)
    ref_k = k * ref.wall
    speedup = ref_k / study.wall
    say("")
    say(f"  {'path':<52} {'wall s':>8} {'cpu s':>8} {'images/s':>9} {'peak MB':>8}")
    for ph in phases:
        say(f"  {ph.name:<52} {ph.wall:8.1f} {ph.cpu:8.1f} {ph.rate:9.1f} {ph.peak_mb:8.0f}")
    say("")
    say(f"  images/s, one trial: kdsweep / reference = {one.rate / ref.rate:.2f}x")
    say(f"  K={k} trials: reference {k} x {ref.wall:.1f} s = {ref_k:.1f} s "
        f"({'one trial measured' if cfg.ref_trials == 1 else f'mean of {cfg.ref_trials} measured'}, times K) "
        f"vs kdsweep study {study.wall:.1f} s ({full}/{k} trials' worth of epochs trained)")
    cs = cache.stats()
    data_mb = sum(t.numel() * t.element_size() for t in (data.train_x, data.val_x, data.test_x)) / 2**20
    say(f"  kdsweep keeps the images on the device as uint8: {data_mb:.1f} MB; peak memory on CPU is the shared process's "
        f"resident set while the path ran (+ DataLoader workers' private memory)")
    if cs["teacher_cache_tables"]:  # unaugmented data: teacher_outputs.py keeps the whole split's outputs
        note = " (no augmentation: the teacher ran once over the training split, each step gathered its rows)"
    else:
        note = " (one lockstep group: the teacher ran once per batch without needing the cache)" if group >= k else ""
    say(f"  teacher cache: {cs['teacher_cache_mb'] * 1024:.0f} KB held, {cs['teacher_cache_hits']} hits, "
        f"{cs['teacher_cache_misses']} misses{note}")
    say(f"  sharing alone, on kdsweep's path: {k} x kdsweep trial / kdsweep study = {k * one.wall / study.wall:.2f} "
        f"(bound {bound:.2f})")
    for n in study.notes:  # whether this run paid for measuring fused against threads (once per machine)
        say(f"  kdsweep study: {n}")
    say(f"  cpu-time speedup {k * ref.cpu / study.cpu:.2f} (spin-waiting threads count here); load average after: {_load_avg()}")
    say(f"speedup={speedup:.2f} bound={bound:.2f}")
    return {"speedup": speedup, "phases": phases, "complete": full, "cache": cs}


def _load_avg() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "n/a"
