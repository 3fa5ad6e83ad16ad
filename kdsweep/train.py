"""Train one student with one distillation method: the inner loop of every trial.

The loop knows no method by name. It asks the method which taps it needs,
computes only those (teacher under no_grad), sums the method's loss terms
and steps SGD over the student and the method's heads. Per-step statistics
are accumulated on the device and read once per epoch, so the step loop has
no host synchronisation.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import DeviceData
from .methods.base import Method
from .models import Net, Outputs


@dataclass(frozen=True)
class Schedule:
    """Optimiser settings shared by every method (the fairness budget)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass
class EpochStats:
    epoch: int  # 0-based
    train: dict[str, float]  # loss terms, "loss" (their sum) and "acc"
    val_loss: float
    val_acc: float
    lr: float
    seconds: float

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


class NonFiniteLoss(RuntimeError):
    """The trial diverged: its loss became NaN/inf, or grew DIVERGENCE_FACTOR-fold over the first step's."""

    def __init__(self, epoch: int, detail: str = "non-finite training loss"):
        super().__init__(f"{detail} in epoch {epoch}")
        self.epoch = epoch


# An epoch's mean training loss this many times the first step's (or 1.0, if larger) counts as diverged.
DIVERGENCE_FACTOR = 100.0


def autocast(device: torch.device):
    # bf16 on CUDA: no loss scaler needed, tensor cores used; fp32 on CPU.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_taps(model: Net, x: torch.Tensor, needs: frozenset[str]) -> Outputs:
    """The model's outputs, computing feature/embedding taps only when asked for."""
    if needs <= {"logits"}:
        return Outputs(model(x), None, None)
    return model.taps(x)


@torch.no_grad()
def evaluate(model: nn.Module, data: DeviceData, split: str) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on a split, with one host sync."""
    was = model.training
    model.eval()
    loss = torch.zeros((), device=data.device)
    correct = torch.zeros((), device=data.device)
    n = 0
    for x, y in data.eval_batches(split):
        with autocast(data.device):
            logits = model(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        n += len(y)
    model.train(was)
    loss_v, correct_v = torch.stack([loss, correct]).tolist()
    return loss_v / n, correct_v / n


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train_student(
    student: Net,
    method: Method,
    teacher: Net | None,
    data: DeviceData,
    schedule: Schedule,
    on_epoch: Callable[[EpochStats], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train `student` with `method`; keep the best-val-accuracy epoch.

    `on_epoch` sees each epoch's statistics and may raise (e.g. Optuna's
    TrialPruned) to stop the run. `progress` is called with the epoch count.
    """
    device = data.device
    student.to(device).train()
    method.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    params = list(student.parameters()) + list(method.parameters())
    opt = torch.optim.SGD(params, lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay)
    steps = data.steps_per_epoch(min(schedule.batch_size, data.n_train))
    total = steps * schedule.epochs
    # Cosine decay per step (not per epoch), so short budgets also anneal to ~0.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / total)))

    needs = frozenset(method.needs)
    result = TrainResult(-1, -1.0, {})
    first_loss: torch.Tensor | None = None  # the untrained model's loss: the yardstick for divergence
    for epoch in range(schedule.epochs):
        t0 = time.perf_counter()
        lr_now = opt.param_groups[0]["lr"]
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=device)
        n = 0
        for x, y in data.epoch(epoch, schedule.batch_size):
            t_out = None
            if teacher is not None and method.uses_teacher:
                with torch.no_grad(), autocast(device):
                    t_out = run_taps(teacher, x, needs)
            with autocast(device):
                s_out = run_taps(student, x, needs)
                terms = method(s_out, t_out, y, epoch)
            loss = sum(terms.values())
            if first_loss is None:
                first_loss = loss.detach().float()  # kept on the device; read with the epoch's statistics
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                b = len(y)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0) + v.detach().float() * b
                correct += (s_out.logits.argmax(1) == y).sum()
                n += b
        # One sync per epoch: all train statistics at once.
        keys = list(sums)
        values = torch.stack([sums[k] for k in keys] + [correct, first_loss]).tolist()
        train = {k: v / n for k, v in zip(keys, values[:-2])}
        train["loss"] = sum(train[k] for k in keys)
        train["acc"] = values[-2] / n
        if not math.isfinite(train["loss"]):
            raise NonFiniteLoss(epoch)
        if train["loss"] > DIVERGENCE_FACTOR * max(values[-1], 1.0):
            raise NonFiniteLoss(epoch, f"training loss diverged ({train['loss']:.3g}, over {DIVERGENCE_FACTOR:g}x "
                                       f"the first step's {values[-1]:.3g})")
        val_loss, val_acc = evaluate(student, data, "val")
        if not math.isfinite(val_loss):
            raise NonFiniteLoss(epoch, "non-finite validation loss")
        stats = EpochStats(epoch, train, val_loss, val_acc, lr_now, time.perf_counter() - t0)
        result.history.append(stats)
        if val_acc > result.best_val_acc:
            result.best_epoch, result.best_val_acc = epoch, val_acc
            result.state = {"student": _snapshot(student), "heads": _snapshot(method)}
        if progress:
            progress(epoch + 1)
        if on_epoch:
            on_epoch(stats)
    return result
