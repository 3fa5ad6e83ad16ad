"""Train students with distillation methods: the inner loop of every trial.

The loop knows no method by name. It asks each method which taps it needs,
computes only those (teacher under no_grad), sums the method's loss terms
and steps the optimiser (SGD, Adam or AdamW) over the student and the method's heads. Per-step statistics
are accumulated on the device and read once per epoch, so the step loop has
no host synchronisation.

One loop serves one trial and K trials in lockstep (`train_students`): the
K students take their steps on the same batch, so the data pass and the
teacher's outputs (from the shared :mod:`teacher_cache`) are paid once per
batch for all K. `train_student` is the K=1 case.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdsweep.common import collector
from kdsweep.common.space import MOMENTUM
from kdsweep.data.device_data import DeviceData
from kdsweep.methods.base import Method, SampleIndex
from kdsweep.models.zoo import Net, Outputs
from kdsweep.training import fusing_memo
from kdsweep.training.devices import (
    Accel,
    _cpu_workers,
    _deal,
    _fuse_min,
    _in_pool,
    _intra_op_threads,
    autocast,
    frozen_copy,
    teacher_dtype,
)
from kdsweep.training.optimizer import Optimizer
from kdsweep.training.teacher_outputs import TeacherCache, TeacherFeed


@dataclass(frozen=True)
class Schedule:
    """Optimiser settings shared by every method (the fairness budget)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = MOMENTUM  # SGD's momentum; Adam's and AdamW's beta1
    weight_decay: float = 5e-4  # SGD and Adam: L2 in the gradient; AdamW: decoupled
    optimizer: str = "sgd"  # one of space.OPTIMIZERS


def make_optimizer(params, s: Schedule, total_steps: int) -> Optimizer:
    """The member's optimiser, its learning rate decaying along a cosine per step (not per epoch), so short
    budgets also anneal to ~0."""
    return Optimizer(params, s.optimizer, s.lr, s.momentum, s.weight_decay, total_steps)


@dataclass
class EpochStats:
    epoch: int  # 0-based
    train: dict[str, float]  # loss terms, "loss" (their sum) and "acc"
    val_loss: float
    val_acc: float
    lr: float
    seconds: float  # wall time of the epoch (in lockstep: of the whole group's epoch)

    def metrics(self) -> dict[str, float]:
        m = {f"train_{k}": v for k, v in self.train.items()}
        m.update(val_loss=self.val_loss, val_acc=self.val_acc, lr=self.lr, epoch_seconds=self.seconds)
        return m


@dataclass
class TrainResult:
    best_epoch: int
    best_val_acc: float
    state: dict[str, dict[str, torch.Tensor]]  # {"student": ..., "heads": ...} at the best epoch
    history: list[EpochStats] = field(default_factory=list)
    stopped_by: BaseException | None = None  # set when the run ended early (diverged, pruned)


class NonFiniteLoss(RuntimeError):
    """The trial diverged: its loss became NaN/inf, or grew DIVERGENCE_FACTOR-fold over the first step's."""

    def __init__(self, epoch: int, detail: str = "non-finite training loss"):
        super().__init__(f"{detail} in epoch {epoch + 1}")  # 1-based for people; .epoch stays 0-based
        self.epoch = epoch


# An epoch's mean training loss this many times the first step's (or 1.0, if larger) counts as diverged.
DIVERGENCE_FACTOR = 100.0


def run_taps(model: Net, x: torch.Tensor, needs: frozenset[str]) -> Outputs:
    """The model's outputs, computing feature/embedding taps only when asked for."""
    if needs <= {"logits"}:
        return Outputs(model(x), None, None)
    return model.taps(x)


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _to_format(model: nn.Module, accel: Accel) -> torch.memory_format:
    """Put a model in the accel's memory format; return the format its inputs should have."""
    if accel.channels_last and _has_conv(model):
        model.to(memory_format=torch.channels_last)
        return torch.channels_last
    return torch.contiguous_format


def _as(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return x.contiguous(memory_format=fmt) if x.dim() == 4 else x


# One compiled callable per (architecture, taps, device) per process: a new student of the
# same architecture reuses the compiled graph (the module is an input, not a constant).
_COMPILED: dict[tuple, Callable] = {}


def _taps_fn(model: nn.Module, needs: frozenset[str], accel: Accel, device: torch.device) -> Callable:
    needs = frozenset(needs)
    if not accel.compile:
        return lambda m, x: run_taps(m, x, needs)
    key = (type(model).__qualname__, repr(model), tuple(sorted(needs)), device.type)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(lambda m, x: run_taps(m, x, needs))
    return _COMPILED[key]


def evaluate_many(models: Sequence[nn.Module], data: DeviceData, split: str, accel: Accel | None = None,
                  workers: int = 1) -> list[tuple[float, float]]:
    """(mean cross-entropy, accuracy) of each model on a split: one pass per worker over the split, one host sync."""
    accel = accel or Accel(channels_last=False)
    device = data.device
    fmts = [_to_format(m, accel) if accel.channels_last else torch.contiguous_format for m in models]
    fns = [_taps_fn(m, frozenset({"logits"}), accel, device) for m in models]

    @torch.no_grad()  # grad mode is per thread: set it in the worker
    def part(idx: list[int]) -> tuple[list[int], torch.Tensor, torch.Tensor, int]:
        loss = torch.zeros(len(idx), device=device)
        correct = torch.zeros(len(idx), device=device)
        n = 0
        for x, y in data.eval_batches(split):
            for j, i in enumerate(idx):
                with autocast(device):
                    logits = fns[i](models[i], _as(x, fmts[i])).logits.float()
                loss[j] += F.cross_entropy(logits, y, reduction="sum")
                correct[j] += (logits.argmax(1) == y).sum()
            n += len(y)
        return idx, loss, correct, n

    was = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        hands = _deal(range(len(models)), workers)
        parts = _in_pool(workers, part, hands) if len(hands) > 1 else [part(hands[0])]
    finally:
        for m, w in zip(models, was):
            m.train(w)
    order = [i for idx, *_ in parts for i in idx]
    values = torch.stack([torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])]).tolist()
    n = parts[0][3]
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(models)
    for i, lv, cv in zip(order, *values):
        out[i] = (lv / n, cv / n)
    return out


def evaluate(model: nn.Module, data: DeviceData, split: str, accel: Accel | None = None) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on a split, with one host sync."""
    return evaluate_many([model], data, split, accel)[0]


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@dataclass
class Member:
    """One trial in a lockstep group: its student, method, schedule and per-epoch callback.

    The global RNG state is captured when the member is made (right after its
    student and heads are initialised) and swapped in around each of its
    steps, so dropout draws the same numbers as when it trains alone.
    """

    student: Net
    method: Method
    schedule: Schedule
    on_epoch: Callable[[EpochStats], None] | None = None
    rng: tuple | None = None


class _Run:
    """The training state of one member."""

    def __init__(self, m: Member, device: torch.device, accel: Accel, total_steps: int):
        self.m, self.device = m, device
        m.student.to(device).train()
        m.method.to(device).train()
        self.fmt = _to_format(m.student, accel)
        self.needs = frozenset(m.method.needs)
        self.taps = _taps_fn(m.student, self.needs, accel, device)
        params = list(m.student.parameters()) + list(m.method.parameters())
        s = m.schedule
        self.opt = make_optimizer(params, s, total_steps)
        self.result = TrainResult(-1, -1.0, {})
        self.stochastic = True  # until its first step shows it draws no random numbers
        self.first_step_seconds = 0.0  # its first step, timed: its weight when members are split (fused.split)
        self.sums: dict[str, torch.Tensor] = {}
        self.correct = torch.zeros((), device=device)
        self.lr_now = s.lr
        self.first_loss: torch.Tensor | None = None

    @property
    def alive(self) -> bool:
        return self.result.stopped_by is None

    def begin_epoch(self) -> None:
        self.lr_now = self.opt.lr
        self.sums, self.correct = {}, torch.zeros((), device=self.device)

    def step(self, x: torch.Tensor, y: torch.Tensor, t_out: Outputs | None, epoch: int, index: SampleIndex) -> None:
        extra = {"index": index} if self.m.method.needs_index else {}
        with autocast(self.device):
            s_out = self.taps(self.m.student, x)
            terms = self.m.method(s_out, t_out, y, epoch, **extra)
        loss = sum(terms.values())
        if self.first_loss is None:
            self.first_loss = loss.detach().float()  # the untrained model's loss: the yardstick for divergence
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            b = len(y)
            for k, v in terms.items():
                self.sums[k] = self.sums.get(k, 0) + v.detach().float() * b
            self.correct += (s_out.logits.argmax(1) == y).sum()

    def epoch_tensors(self) -> list[torch.Tensor]:
        return [self.sums[k] for k in self.sums] + [self.correct, self.first_loss]

    def epoch_train(self, values: list[float], n: int) -> dict[str, float]:
        keys = list(self.sums)
        train = {k: v / n for k, v in zip(keys, values[:-2])}
        train["loss"] = sum(train[k] for k in keys)
        train["acc"] = values[-2] / n
        return train

    def diverged(self, train: dict[str, float], values: list[float], epoch: int) -> NonFiniteLoss | None:
        if not math.isfinite(train["loss"]):
            return NonFiniteLoss(epoch)
        first = values[-1]
        if train["loss"] > DIVERGENCE_FACTOR * max(first, 1.0):
            return NonFiniteLoss(epoch, f"training loss diverged ({train['loss']:.3g}, over {DIVERGENCE_FACTOR:g}x "
                                        f"the first step's {first:.3g})")
        return None


def _check_group(members: Sequence[Member]) -> tuple[int, int]:
    if not members:
        raise ValueError("train_students needs at least one member")
    first = members[0].schedule
    for m in members[1:]:
        if (m.schedule.epochs, m.schedule.batch_size) != (first.epochs, first.batch_size):
            raise ValueError("lockstep members must share epochs and batch size (they share the batch stream)")
    return first.epochs, first.batch_size


# Whether fusing paid, and how that was found, per fusing_memo question (as JSON): this process's copy of what
# fusing_memo keeps on disk.
_FUSING_PAYS: dict[str, tuple[bool, str]] = {}


def _copy_run(r: _Run, device: torch.device, accel: Accel, total_steps: int) -> _Run:
    """A scratch copy of a member's training state (student, heads, optimiser state) for timing its next steps."""
    copy_ = _Run(Member(copy.deepcopy(r.m.student), copy.deepcopy(r.m.method), r.m.schedule), device, accel, total_steps)
    copy_.opt.load_state_dict(copy.deepcopy(r.opt.state_dict()))  # its own buffers: load_state_dict keeps tensors
    copy_.first_loss, copy_.stochastic, copy_.first_step_seconds = r.first_loss, False, r.first_step_seconds
    copy_.sums = {k: v.clone() for k, v in r.sums.items()}  # the loss terms its method returns, as a group reads them
    return copy_


def _seconds_a_step(step: Callable[[], object], repeats: int = 3, against: float | None = None) -> float:
    """The fastest of `repeats` timed calls of `step`, after one untimed (warm-up: allocations, vmap's first trace).

    Given `against` (the other path's time), it stops as soon as the answer is clear: a call faster than it, or
    one over twice as slow (load can slow a call, rarely by half): measuring costs real steps, which a short
    study feels (a fused step of eight small convolutions took 3 s on 2 cores, the threads' 1 s)."""
    step()
    times: list[float] = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
        if against is not None and (times[-1] < against or times[-1] > 2 * against):
            break
    return min(times)


def _first_step(r: _Run) -> float:
    """What a member weighs when members are dealt to worker threads or fused groups: its first step's time."""
    return r.first_step_seconds


def _call(job: Callable[[], object]) -> object:
    return job()


def _fused_step(g, x, y, t_out, epoch: int, index: SampleIndex) -> None:
    try:
        g.call(x, y, t_out, epoch, index)
    except RuntimeError as e:
        if "randomness" in str(e):  # vmap's refusal, in a fused forward or a batched loss
            raise _drew() from e
        raise


def _hand_step(hand: list, xs: dict, y, t_out, epoch: int, index: SampleIndex) -> None:
    for r in hand:
        r.step(xs[r.fmt], y, t_out, epoch, index)


def _drew() -> RuntimeError:
    return RuntimeError("a lockstep member drew random numbers after its first step; its stream cannot be replayed "
                        "alongside the others': run it with --no-fused or --parallel 1")


class Lockstep:
    """K students trained in lockstep over one batch stream, one epoch per call of :meth:`epoch`.

    Per batch, the data are augmented once and the teacher's outputs are
    computed (or read from the cache) once; then every live student takes its
    step. On CUDA the students step one after another (kernels queue
    asynchronously). On CPU, when K >= 2, each core gets a worker thread with
    one intra-op thread: the teacher batch is split across them and the
    students are dealt out to them (small convolutions scale badly over
    intra-op threads; see docs/performance.md).

    Each member's RNG stream is its own: a member that draws random numbers
    (dropout) steps on the calling thread with its RNG state swapped in; the
    first step of a group finds out which members do.

    With `Accel.fused` (default: on CUDA for K >= 2), after that first step the
    members that drew no random numbers are stacked, per student architecture
    (whatever their methods), into `fused.FusedGroup`s: one vmapped forward, one backward and one
    fused optimiser update for all of them (kdsweep/fused.py).

    A member whose loss goes non-finite stops with `NonFiniteLoss` in its
    result's `stopped_by`; so does one whose `on_epoch` raises one of
    `stop_on` (e.g. Optuna's TrialPruned). The others carry on. Any other
    exception from `on_epoch` ends the whole group.
    """

    def __init__(self, members: Sequence[Member], teacher: Net | None, data: DeviceData, *,
                 cache: TeacherCache | None = None, accel: Accel | None = None,
                 stop_on: tuple[type[BaseException], ...] = ()):
        collector.resume()  # a command's start-up ends with its first training (common/collector.py)
        self.data, self.device, self.stop_on = data, data.device, stop_on
        self.accel = accel or Accel()
        self.epochs, self.batch_size = _check_group(members)
        self.steps = steps = data.steps_per_epoch(min(self.batch_size, data.n_train))
        self.runs = [_Run(m, self.device, self.accel, steps * self.epochs) for m in members]
        uses_teacher = teacher is not None and any(r.m.method.uses_teacher for r in self.runs)
        self.workers = _cpu_workers(self.accel, self.device, len(self.runs), uses_teacher)
        self.fuse = _fuse_min(self.accel, self.device, len(self.runs))
        self.groups: list = []  # fused.FusedGroup, formed after the first step (the probe)
        self.notes: list[str] = []  # why members that could have been fused were not
        self.fused_members = 0
        self.swap_rng = len(self.runs) > 1 or self.fuse is not None
        if self.swap_rng:
            for r in self.runs:
                r.m.rng = r.m.rng or _rng_state(self.device)
        self.probed = False  # whether the first step has shown which members draw random numbers
        self.feed = None
        if uses_teacher:
            t_needs = frozenset().union(*(r.needs for r in self.runs if r.m.method.uses_teacher))
            self.feed = self._teacher_feed(teacher, t_needs, cache)
        self.fmts = {r.fmt for r in self.runs}
        self.next_epoch = 0

    def _teacher_feed(self, teacher: Net, needs: frozenset[str], cache: TeacherCache | None) -> TeacherFeed:
        device, workers = self.device, self.workers
        teacher.to(device).eval()
        fmt = _to_format(teacher, self.accel)
        net = frozen_copy(teacher, teacher_dtype(device))  # bf16 once on CUDA, not per forward pass
        fn = _taps_fn(net, needs, self.accel, device)

        @torch.no_grad()  # grad mode is per thread: the workers set it themselves
        def run(x):
            with autocast(device):
                return fn(net, _as(x, fmt))

        def compute(x):
            if workers == 1:
                return run(x)
            parts = _in_pool(workers, run, x.chunk(workers))
            return Outputs(*(None if t[0] is None else torch.cat(t) for t in zip(*parts)))

        tag = f"{self.accel.tag(device)}|split{workers}"
        return TeacherFeed(cache, teacher, self.data, self.batch_size, needs, compute, tag)

    @property
    def done(self) -> bool:
        return self.next_epoch >= self.epochs or not any(r.alive for r in self.runs)

    def results(self) -> list[TrainResult]:
        return [r.result for r in self.runs]

    def _steps(self, active: list[_Run], xs: dict, y: torch.Tensor, t_out: Outputs | None, epoch: int,
               index: SampleIndex) -> None:
        """One step of every active member on this batch."""
        shared = [(t, t._version) for t in (t_out or ()) if t is not None]
        fused = {id(r) for g in self.groups for r in g.runs}
        serial = rest = [r for r in active if id(r) not in fused]
        # The jobs that draw no random numbers: each fused group, and hands of the other members on worker threads.
        jobs = [functools.partial(_fused_step, g, xs[g.fmt], y, t_out, epoch, index) for g in self.groups]
        if self.workers > 1 and self.probed and len(rest) > 1:
            serial = [r for r in rest if r.stochastic]
            jobs += [functools.partial(_hand_step, hand, xs, y, t_out, epoch, index)
                     for hand in _deal([r for r in rest if not r.stochastic], self.workers, cost=_first_step)]
        if jobs:
            before = _rng_state(self.device)
            if self.workers > 1 and len(jobs) > 1:
                _in_pool(self.workers, _call, jobs)
            else:
                for job in jobs:
                    job()
            if any(a is not None and not torch.equal(a, b) for a, b in zip(before, _rng_state(self.device))):
                raise _drew()
        for r in serial:
            if self.swap_rng:
                before = r.m.rng
                _set_rng_state(before, self.device)
            started = time.perf_counter()
            r.step(xs[r.fmt], y, t_out, epoch, index)
            if not self.probed:
                r.first_step_seconds = time.perf_counter() - started
            if self.swap_rng:
                r.m.rng = _rng_state(self.device)
                if not self.probed:
                    r.stochastic = any(a is not None and not torch.equal(a, b) for a, b in zip(before, r.m.rng))
        if not self.probed and self.fuse is not None:
            self._form_groups(active, xs, (y, t_out, epoch, index))
        self.probed = True
        if len(active) > 1 and any(t._version != v for t, v in shared):
            raise RuntimeError(f"{type(active[0].m.method).__name__} modified the teacher's outputs in place; lockstep "
                               "members share them: the method must not write to its `t` argument")

    def _form_groups(self, active: list[_Run], xs: dict, batch: tuple) -> None:
        """Stack the members that drew no random numbers in the first step into fused groups (kdsweep/fused.py);
        on CPU without --fused/--no-fused, only where fusing measured faster (`_fusing_pays`). With worker
        threads (CPU), the members of a key are split into one fused group per worker, stepping side by side."""
        from kdsweep.training import fused

        for runs in fused.plan([r for r in active if not r.stochastic], self.fuse):
            if self.accel.fused is None and self.device.type == "cpu" and not self._fusing_pays(runs, xs, batch):
                continue
            for part in fused.split(runs, self._fused_groups(runs), _first_step):
                try:
                    g = fused.FusedGroup(part, self.device, self.steps * self.epochs, 1, (xs[part[0].fmt], *batch))
                except fused.NotFusable as e:
                    self.notes.append(f"{len(part)} members train one after another, not fused: {e}")
                    continue
                # On CUDA the compiled step is also captured as a CUDA graph (replayed with one launch, where
                # torch.compile finds it safe to), the point of a step with no host sync.
                mode = {"mode": "reduce-overhead"} if self.device.type == "cuda" else {}
                g.call = g.compiled_step(**mode) if self.accel.compile else g.step
                for r in part:
                    r.opt.state.clear()  # the fused optimiser holds the state now
                self.groups.append(g)
                self.fused_members += len(part)

    def _fused_groups(self, runs: list) -> int:
        """Into how many fused groups members of one key go: one per worker thread, each of two members at least."""
        return max(1, min(self.workers, len(runs) // 2))

    def _fusing_pays(self, runs: list[_Run], xs: dict, batch: tuple) -> bool:
        """Whether these members step faster fused than on the worker threads, measured once per machine for their
        architecture, batch and methods (how many of each), on copies of them (their next steps on this batch), and
        kept in the cache folder (`fusing_memo`): no fixed rule fits every model (on a 2-core CPU fusing wins for
        MNIST-1D's MLP and loses for small convolutions, docs/performance.md)."""
        from kdsweep.training import fused

        methods = tuple(sorted(collections.Counter(type(r.m.method).__name__ for r in runs).items()))
        x, (y, t_out, epoch, index) = xs[runs[0].fmt], batch
        # The methods too: their losses differ in cost; the batch's shape: it sets the work a step does.
        question = fusing_memo.question(runs[0].m.student, runs[0].m.schedule.optimizer, runs[0].fmt, tuple(x.shape),
                                        methods, self.workers)
        key = json.dumps(question, sort_keys=True)
        if key in _FUSING_PAYS:  # this process knows: the same choice, said again for this group
            pays, said = _FUSING_PAYS[key]
            self.notes.append(said)
            return pays
        what = f"{len(runs)} {type(runs[0].m.student).__name__} students"
        kept = fusing_memo.recall(question)
        remeasure = fusing_memo.contended(kept) if kept is not None else None
        if remeasure:
            self.notes.append(f"{what}: {remeasure}")
        elif kept is not None:
            said = (f"{what}: {'fused' if kept['fused'] else 'worker threads'}, as measured on this machine on "
                    f"{kept.get('measured', '?')} (fused {kept.get('fused_ms', '?')} ms a step, threads "
                    f"{kept.get('threads_ms', '?')} ms; {fusing_memo.folder()} keeps it)")
            _FUSING_PAYS[key] = kept["fused"], said
            self.notes.append(said)
            return kept["fused"]
        total = self.steps * self.epochs
        copies = [_copy_run(r, self.device, self.accel, total) for r in runs]
        hands = _deal(copies, self.workers, cost=_first_step)
        threaded = _seconds_a_step(lambda: _in_pool(self.workers, lambda hand: [
            r.step(x, y, t_out, epoch, index) for r in hand], hands) if len(hands) > 1 else
            [r.step(x, y, t_out, epoch, index) for r in copies])
        try:
            groups = [fused.FusedGroup(part, self.device, total, 1, (x, *batch)) for part in
                      fused.split([_copy_run(r, self.device, self.accel, total) for r in runs], self._fused_groups(runs),
                                  _first_step)]
        except fused.NotFusable:
            return True  # the real attempt says why
        steps = [functools.partial(g.step, x, y, t_out, epoch, index) for g in groups]
        stacked = _seconds_a_step(lambda: _in_pool(self.workers, _call, steps) if len(steps) > 1 else steps[0](),
                                  against=threaded)
        said = (f"{what}: fused ({len(groups)} group{'s' if len(groups) > 1 else ''}) {stacked * 1e3:.1f} ms a step, "
                f"worker threads {threaded * 1e3:.1f} ms: {'fused' if stacked < threaded else 'threads'}")
        _FUSING_PAYS[key] = stacked < threaded, said
        self.notes.append(said)
        unkept = fusing_memo.remember(question, stacked < threaded, stacked, threaded)
        if unkept:
            self.notes.append(unkept)
        return stacked < threaded

    def epoch(self) -> bool:
        """Train every live member for one epoch, evaluate, call back; False when there was nothing left to do."""
        if self.done:
            return False
        # On CPU every student's step runs on one intra-op thread, whatever its method (a teacher-free trial
        # too, K = 1 too), so the report's costs compare like with like: intra-op parallelism over small ops
        # costs more than it gives, and under load it thrashes (a digits `ce` trial took 39.5 s on two
        # threads, 2.5 s on one); the cores serve the worker threads instead (docs/performance.md).
        # --cpu-workers 0 asks for intra-op threads instead, for every method alike.
        one_thread = self.device.type == "cpu" and self.accel.cpu_workers != 0
        with _intra_op_threads(1) if one_thread else contextlib.nullcontext():
            finite = self._train_epoch()
        for r, _ in finite:
            if r.alive and r.m.on_epoch is not None:
                try:
                    r.m.on_epoch(r.result.history[-1])
                except self.stop_on as e:
                    r.result.stopped_by = e
        if self.swap_rng and self.done:  # leave the global RNG where the last member's stream ended
            _set_rng_state(self.runs[-1].m.rng, self.device)
        return True

    def _train_epoch(self) -> list[tuple[_Run, dict]]:
        epoch = self.next_epoch
        self.next_epoch += 1
        active = [r for r in self.runs if r.alive]
        t0 = time.perf_counter()
        for r in active:
            r.begin_epoch()
        self.groups = [g for g in self.groups if g.alive]
        for g in self.groups:
            g.begin_epoch(epoch * self.steps)
        if self.feed is not None:
            self.feed.begin_epoch(epoch)
        n = 0
        for step, (x, y, ids) in enumerate(self.data.epoch(epoch, self.batch_size, index=True)):
            xs = {fmt: _as(x, fmt) for fmt in self.fmts}
            t_out = self.feed(step, x, ids) if self.feed is not None else None
            self._steps(active, xs, y, t_out, epoch, SampleIndex(ids, self.data.n_train))
            n += len(y)
        for g in self.groups:
            g.end_epoch()  # stacked state back into each member's modules, statistics into its _Run
        # One sync per epoch: every member's train statistics at once.
        flat = [r.epoch_tensors() for r in active]
        values = torch.stack([t for ts in flat for t in ts]).tolist()
        finite, i = [], 0
        for ts, r in zip(flat, active):
            vals = values[i : i + len(ts)]
            i += len(ts)
            train = r.epoch_train(vals, n)
            failure = r.diverged(train, vals, epoch)
            if failure is None:
                finite.append((r, train))
            else:
                r.result.stopped_by = failure
        students = [r.m.student for r, _ in finite]
        evals = evaluate_many(students, self.data, "val", self.accel, self.workers) if finite else []
        seconds = time.perf_counter() - t0
        for (r, train), (val_loss, val_acc) in zip(finite, evals):
            if not math.isfinite(val_loss):
                r.result.stopped_by = NonFiniteLoss(epoch, "non-finite validation loss")
                continue
            r.result.history.append(EpochStats(epoch, train, val_loss, val_acc, r.lr_now, seconds))
            if val_acc > r.result.best_val_acc:
                r.result.best_epoch, r.result.best_val_acc = epoch, val_acc
                r.result.state = {"student": _snapshot(r.m.student), "heads": _snapshot(r.m.method)}
        return finite


def train_students(
    members: Sequence[Member],
    teacher: Net | None,
    data: DeviceData,
    *,
    cache: TeacherCache | None = None,
    accel: Accel | None = None,
    progress: Callable[[int], None] | None = None,
    stop_on: tuple[type[BaseException], ...] = (),
) -> list[TrainResult]:
    """Train K students in lockstep over one batch stream; keep each one's best-val-accuracy epoch (see Lockstep)."""
    group = Lockstep(members, teacher, data, cache=cache, accel=accel, stop_on=stop_on)
    while group.epoch():
        if progress:
            progress(group.next_epoch)
    return group.results()


def train_student(
    student: Net,
    method: Method,
    teacher: Net | None,
    data: DeviceData,
    schedule: Schedule,
    on_epoch: Callable[[EpochStats], None] | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    cache: TeacherCache | None = None,
    accel: Accel | None = None,
) -> TrainResult:
    """Train `student` with `method`; keep the best-val-accuracy epoch.

    `on_epoch` sees each epoch's statistics and may raise (e.g. Optuna's
    TrialPruned) to stop the run. `progress` is called with the epoch count.
    Raises NonFiniteLoss if the loss diverges.
    """
    (result,) = train_students([Member(student, method, schedule, on_epoch)], teacher, data, cache=cache, accel=accel,
                               progress=progress)
    if result.stopped_by is not None:
        raise result.stopped_by
    return result
