"""One member's optimiser: SGD, Adam or AdamW with the per-step cosine learning rate every trial uses.

The update is torch.optim's (SGD with momentum and L2 decay in the gradient; Adam with L2 in the gradient;
AdamW with decoupled decay; betas = (momentum, 0.999), eps = 1e-8), op for op with the same Python-float
scalars, so the parameters come out equal to the last bit (tests/test_optimizer.py checks against
torch.optim with LambdaLR). Why not torch.optim itself: constructing any torch.optim optimiser imports
torch._dynamo (its add_param_group is wrapped to be skipped by the compiler), 1.2 s of a sweep's start-up on
2 cores (issue 20), and nothing here compiles it. `fused.FusedOptimizer` is the same update for K stacked members.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

KINDS = ("sgd", "adam", "adamw")
BETA2, EPS = 0.999, 1e-8


class Optimizer:
    """`step()` updates the parameters from their gradients and moves the learning rate one step along
    base_lr * 0.5 (1 + cos(pi t / total_steps)); `lr` is the rate the next step uses. `state` maps a
    parameter to its buffers, named as torch.optim names them ("momentum_buffer", "exp_avg", "exp_avg_sq")."""

    def __init__(self, params: Iterable[torch.Tensor], kind: str, lr: float, momentum: float, weight_decay: float,
                 total_steps: int):
        if kind not in KINDS:
            raise ValueError(f"unknown optimizer {kind!r}")
        self.params = list(params)
        self.kind, self.base_lr, self.momentum, self.weight_decay = kind, lr, momentum, weight_decay
        self.total, self.t, self.lr = total_steps, 0, lr
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        ps = [p for p in self.params if p.grad is not None]  # as torch.optim: a parameter without one is left alone
        if ps:
            (self._sgd if self.kind == "sgd" else self._adam)(ps, [p.grad for p in ps])
        self.t += 1
        self.lr = self.base_lr * (0.5 * (1 + math.cos(math.pi * self.t / self.total)))

    def _sgd(self, ps: list[torch.Tensor], gs: list[torch.Tensor]) -> None:
        if self.weight_decay != 0:
            gs = torch._foreach_add(gs, ps, alpha=self.weight_decay)
        if self.momentum != 0:
            kept = [(self.state[p]["momentum_buffer"], g) for p, g in zip(ps, gs) if p in self.state]
            if kept:
                torch._foreach_mul_([b for b, _ in kept], self.momentum)
                torch._foreach_add_([b for b, _ in kept], [g for _, g in kept], alpha=1)
            for p, g in zip(ps, gs):
                if p not in self.state:  # its first step with a gradient: the buffer is the gradient itself
                    self.state[p] = {"momentum_buffer": torch.clone(g).detach()}
            gs = [self.state[p]["momentum_buffer"] for p in ps]
        torch._foreach_add_(ps, gs, alpha=-self.lr)

    def _adam(self, ps: list[torch.Tensor], gs: list[torch.Tensor]) -> None:
        for p in ps:
            if p not in self.state:
                self.state[p] = {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            self.state[p]["step"] += 1  # per parameter, as torch.optim: one may have missed a step (no gradient)
        steps = [self.state[p]["step"] for p in ps]
        if self.weight_decay != 0:
            if self.kind == "adamw":
                torch._foreach_mul_(ps, 1 - self.lr * self.weight_decay)
            else:
                gs = torch._foreach_add(gs, ps, alpha=self.weight_decay)
        ms = [self.state[p]["exp_avg"] for p in ps]
        vs = [self.state[p]["exp_avg_sq"] for p in ps]
        torch._foreach_lerp_(ms, gs, 1 - self.momentum)
        torch._foreach_mul_(vs, BETA2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - BETA2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [(1 - BETA2 ** n) ** 0.5 for n in steps])
        torch._foreach_add_(denom, EPS)
        torch._foreach_addcdiv_(ps, ms, denom, [-(self.lr / (1 - self.momentum ** n)) for n in steps])

    def state_dict(self) -> dict:
        """The step count and every parameter's buffers, by the parameter's position."""
        return {"t": self.t, "state": {i: dict(self.state[p]) for i, p in enumerate(self.params) if p in self.state}}

    def load_state_dict(self, saved: dict) -> None:
        """Take `saved`'s step count and buffers (the tensors themselves, as torch.optim does: copy them first)."""
        self.t = saved["t"]
        self.lr = self.base_lr * (0.5 * (1 + math.cos(math.pi * self.t / self.total)))
        self.state = {self.params[i]: dict(bufs) for i, bufs in saved["state"].items()}
