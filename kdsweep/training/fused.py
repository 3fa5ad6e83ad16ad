"""Fused lockstep students: K students of one architecture trained as one model, each with its own method.

On CUDA, a small student's step is launch-bound: about 150 kernels of a few
microseconds each. Stepping K students one after another issues K times as
many. Here the K students' parameters and buffers are stacked along a new
leading dimension (`torch.func.stack_module_state`) and their forward is one
`torch.func.vmap` over `functional_call` of the student's taps, with the batch
shared (convolutions become grouped convolutions, linears batched matmuls): the
kernel count no longer grows with K. Trials of several methods (a sweep's)
fuse together: the stacked forward computes the taps any member needs, and
each method's members compute their losses on their slice of the stacked
outputs, in one vmapped pass of the method with the hyperparameters that
differ as (K_m,) tensors (`_Heads`; one member at a time for methods with
state). The K losses are summed for one backward, and one fused optimiser
update (:class:`FusedOptimizer`: SGD, Adam, AdamW as torch.optim computes them,
with per-member learning rate, schedule, momentum/beta1 and weight decay as
(K, 1, ...) tensors) steps all K.

What is fused, and what is not (docs/performance.md, "Fused students"):
  * Only members that draw no random numbers. Dropout under vmap cannot
    replay each member's own RNG stream, so members that draw (found by the
    lockstep group's first step) keep stepping alone with their RNG swapped in.
    The forward runs under ``vmap(randomness="error")`` and the global RNG is
    compared around every fused step, so a member that starts drawing later is
    refused rather than silently desynchronised.
  * The group's first step is taken on the ordinary path (it is the probe);
    the fused group starts from the members' state and optimiser state after it.
  * Method heads (fitnet's regressor, crd's projections, ...) are stacked per
    method and updated with a fused optimiser of their own; their buffers (batch-norm statistics, crd's
    memory banks) stay in each member's own method module, which runs eagerly.
  * A member that stops (pruned, diverged) is dropped at the next epoch: the
    live members are re-stacked, optimiser state included. Within an epoch a
    diverging member's NaNs stay in its own slice.

The stacked tensors are the truth while training; after each epoch they are
copied back into each member's modules, so evaluation, snapshots (ordinary
state_dicts) and callbacks see ordinary modules.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call, stack_module_state, vmap

from kdsweep.common import native
from kdsweep.methods.base import SampleIndex
from kdsweep.models.zoo import TAPS, Outputs
from kdsweep.training.devices import _deal, autocast
from kdsweep.training.optimizer import BETA2, EPS, KINDS


class _Taps(nn.Module):
    """`functional_call` calls forward(): this one returns the student's taps, as a tuple of the needed ones."""

    def __init__(self, model: nn.Module, needs: frozenset[str]):
        super().__init__()
        self.model = model
        self.names = ("logits",) if needs <= {"logits"} else TAPS

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.names == ("logits",):
            return (self.model(x),)
        o = self.model.taps(x)
        return tuple(getattr(o, n) for n in self.names)


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (K,) vector shaped (K, 1, ..., 1) to broadcast over a stacked (K, ...) tensor (a view: no kernel)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _wide(device: torch.device) -> torch.dtype:
    # Schedules and bias corrections in float64, as torch.optim computes them in Python floats
    # (1 - 0.999 ** t loses digits in float32); devices without float64 (mps) use float32.
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


_P = ctypes.c_void_p
_ADAM = native.Kernel(Path(__file__).with_name("fused_adam.c"), {
    "fused_adam_f32": (None, [_P, _P, _P, _P, ctypes.c_int64, ctypes.c_int64, _P, _P, _P, _P,
                              ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_int]),
})


class FusedOptimizer:
    """One update of K stacked parameter sets, each member with its own hyperparameters.

    Equals `optimizer.Optimizer` for each member (torch.optim's SGD, Adam and
    AdamW with the per-step cosine learning rate) up to float rounding: the
    step count and learning rates live on the device as (K,) tensors, so an
    update reads nothing back to the host. On a CPU, Adam and AdamW in float32
    update each tensor in one pass in C (fused_adam.c) where torch's ops make eight.
    """

    def __init__(self, kind: str, params: Sequence[torch.Tensor], schedules: Sequence, total_steps: int,
                 steps_done: int = 0):
        if kind not in KINDS:
            raise ValueError(f"unknown optimizer {kind!r}")
        self.kind, self.total = kind, total_steps
        dev = params[0].device
        wide = _wide(dev)

        def vec(values):
            return torch.tensor([float(v) for v in values], dtype=wide, device=dev)

        self.base_lr = vec(s.lr for s in schedules)
        self.momentum = vec(s.momentum for s in schedules)  # SGD's momentum; Adam's beta1
        self.weight_decay = vec(s.weight_decay for s in schedules)
        self.decays = any(s.weight_decay != 0 for s in schedules)  # as torch.optim, no decay term when it is 0
        self.beta2, self.eps = BETA2, EPS
        self.t = torch.tensor(float(steps_done), dtype=wide, device=dev)  # updates taken (LambdaLR's last_epoch)
        names = ("momentum_buffer",) if kind == "sgd" else ("exp_avg", "exp_avg_sq")
        self.state = {n: [torch.zeros_like(p) for p in params] for n in names}

    def lr(self) -> torch.Tensor:
        """(K,) learning rates of the next update: base * 0.5 (1 + cos(pi t / total)), as loop.py's LambdaLR."""
        return self.base_lr * (0.5 * (1 + torch.cos(math.pi * self.t / self.total)))

    @torch.no_grad()
    def step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
        """The update, as torch.optim computes it, op for op; each op over all tensors at once (torch._foreach_*:
        one call instead of one per tensor, which on a small model costs more than the arithmetic)."""
        f = params[0].dtype  # per-step scalars are computed wide and rounded once, as torch.optim's Python floats are
        lr = self.lr()
        self.t += 1
        # as torch.optim: a parameter without a gradient is left alone
        have = [i for i, g in enumerate(grads) if g is not None]
        ps, gs = [params[i] for i in have], [grads[i] for i in have]
        if not ps:
            return
        state = {n: [bufs[i] for i in have] for n, bufs in self.state.items()}

        def cols(v: torch.Tensor) -> list[torch.Tensor]:  # (K,) values shaped to broadcast over each tensor (views)
            return [_col(v, p) for p in ps]

        wd, mom = self.weight_decay.to(f), self.momentum.to(f)
        if self.kind == "sgd":
            if self.decays:
                gs = torch._foreach_add(gs, torch._foreach_mul(ps, cols(wd)))
            bufs = state["momentum_buffer"]
            torch._foreach_mul_(bufs, cols(mom))  # zeros at the start: the first buffer is the gradient
            torch._foreach_add_(bufs, gs)
            torch._foreach_addcmul_(ps, bufs, cols(lr.to(f)), value=-1)
            return
        b1 = self.momentum
        step_size = (lr / (1 - b1 ** self.t)).to(f)
        bc2_sqrt = ((1 - self.beta2 ** self.t) ** 0.5).to(f)
        decay, w1 = (1 - lr * self.weight_decay).to(f), (1 - b1).to(f)
        ms, vs = state["exp_avg"], state["exp_avg_sq"]
        if (f == torch.float32 and _ADAM.usable_for(ps[0].device)
                and all(t.is_contiguous() for t in (*ps, *ms, *vs))):
            mode = 0 if not self.decays else 2 if self.kind == "adamw" else 1
            scalars = [t.contiguous() for t in (w1, step_size, wd, decay)]  # (K,) each, held through the calls
            fn, bc2 = _ADAM.library().fused_adam_f32, bc2_sqrt.item()  # on a CPU: no device to wait for
            for p, g, m, v in zip(ps, gs, ms, vs):
                g = g.contiguous()
                fn(p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), p.shape[0], p.numel() // p.shape[0],
                   *(t.data_ptr() for t in scalars), bc2, self.beta2, 1 - self.beta2, self.eps, mode)
            torch.autograd.graph.increment_version([*ps, *ms, *vs])  # written in place, as torch's own ops count it
            return
        if self.kind == "adamw" and self.decays:
            torch._foreach_mul_(ps, cols(decay))
        elif self.decays:
            gs = torch._foreach_add(gs, torch._foreach_mul(ps, cols(wd)))
        torch._foreach_lerp_(ms, gs, cols(w1))
        torch._foreach_mul_(vs, self.beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - self.beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [bc2_sqrt] * len(ps))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcmul_(ps, torch._foreach_div(ms, denom), cols(step_size), value=-1)

    def keep(self, idx: list[int]) -> None:
        """Keep the members at positions `idx` (the others stopped)."""
        for n, bufs in self.state.items():
            self.state[n] = [torch.stack([b[i] for i in idx]) for b in bufs]
        for n in ("base_lr", "momentum", "weight_decay"):
            v = getattr(self, n)
            setattr(self, n, torch.stack([v[i] for i in idx]))


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.detach() for t in tensors])


def fusion_key(run) -> tuple:
    """Members with equal keys can be stacked: the same student architecture, optimiser and memory format.
    Their methods may differ: each member's loss is its own, and heads are stacked per method (`_Heads`)."""
    s = run.m.student
    shapes = tuple((n, tuple(t.shape), t.dtype) for n, t in [*s.named_parameters(), *s.named_buffers()])
    return type(s), repr(s), shapes, run.m.schedule.optimizer, run.fmt


def head_key(run) -> tuple:
    """Members with equal keys share a method and the shapes of its heads: their heads stack."""
    m = run.m.method
    return type(m), tuple((n, tuple(p.shape), p.dtype) for n, p in m.named_parameters())


class NotFusable(Exception):
    """These members cannot be stacked; the message says why (they then step one after another)."""


class _Heads:
    """The members of a fused group that share a method: their heads stacked, with one fused optimiser, and their
    loss terms summed over the epoch as (K_m,) tensors. `pos`: their positions in the group, contiguous.

    Their losses are computed in one pass where the method allows it: the method's forward under `vmap` over the
    members, with the heads stacked and the hyperparameters that differ as (K_m,) tensors, so the kernel count
    (and the backward's) does not grow with K_m. Allowed means: two members or more, no buffers and no
    per-sample state (those are updated in place per member), and, on the group's first step, the batched terms
    equal the members' own within float rounding (a method whose forward reads a hyperparameter on the host
    fails under vmap instead).
    Otherwise each member's loss is computed on its own, as it would be alone.
    """

    def __init__(self, runs: list, pos: list[int], total_steps: int, steps_done: int):
        self.runs, self.pos = runs, pos
        self.keys = list(runs[0].sums)
        if any(list(r.sums) != self.keys for r in runs):
            raise NotFusable(f"{type(runs[0].m.method).__name__}'s members return different loss terms")
        self.needs_index = runs[0].m.method.needs_index
        self.params = {n: _stack([dict(r.m.method.named_parameters())[n] for r in runs]).requires_grad_()
                       for n, _ in runs[0].m.method.named_parameters()}
        leaves = list(self.params.values())
        self.opt = FusedOptimizer(runs[0].m.schedule.optimizer, leaves, [r.m.schedule for r in runs], total_steps,
                                  steps_done) if leaves else None
        if self.opt is not None:
            _copy_state(self.opt, runs, lambda r: list(r.m.method.parameters()))
        self.sums = {k: torch.stack([r.sums[k] for r in runs]) for k in self.keys}
        m = runs[0].m.method
        # None: not tried yet (decided on the first step); False: one member at a time (`why` says why)
        self.batched: bool | None = None if not self.needs_index and not list(m.buffers()) else False
        self.why = "" if self.batched is None else "it keeps per-member state (buffers or per-sample memory)"
        self._unless_alone()
        self.hp = self._batched_hp()

    def _unless_alone(self) -> None:
        # One member has nothing to batch, and a vmap over one member costs about twice its own call on a CPU (on
        # a GPU both launch the same kernels). A sweep of many methods makes fused groups of about one member per
        # method (benchmarks/lone_members.py).
        if len(self.runs) == 1 and self.batched is not False:
            self.batched, self.why = False, "one member: its loss computed as alone"

    def _batched_hp(self) -> dict:
        """The members' hyperparameters for one batched forward: a value all share stays as it is (a Python
        float, as alone); one that differs becomes a (K_m,) float32 tensor: a Python float meeting a float32
        tensor is rounded to float32, and so is this (in float64 the product of two 0-dim values would stay
        float64, and training would drift from the member's own by rounding)."""
        hps = [r.m.method.hp for r in self.runs]
        out = {}
        for k, v in hps[0].items():
            vals = [h[k] for h in hps]
            if all(x == v for x in vals):
                out[k] = v
            elif all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
                dev = next(iter(self.params.values()), self.runs[0].correct).device
                out[k] = torch.tensor([float(x) for x in vals], dtype=torch.float32, device=dev)
            else:
                self.batched, self.why = False, f"its members' {k} differ and is not a number"
        return out

    @property
    def span(self) -> slice:
        return slice(self.pos[0], self.pos[-1] + 1)

    def losses(self, s_all: Outputs, t_out, y, epoch: int, index: SampleIndex) -> tuple[dict, torch.Tensor]:
        """The members' loss terms, term -> (K_m,), on their slice of the stacked student outputs, and their sums."""
        s_mine = self._mine(s_all)
        terms = self._batched(s_mine, t_out, y, epoch) if self.batched else self._one_by_one(s_mine, t_out, y, epoch, index)
        return terms, sum(terms.values())

    def _mine(self, s_all: Outputs) -> Outputs:
        return Outputs(*(None if o is None else o[self.span] for o in s_all))

    @torch.no_grad()
    def choose(self, s_all: Outputs, t_out, y, epoch: int, index: SampleIndex) -> None:
        """Batch the members' losses if the batched forward runs and gives their own terms on this batch (the
        group's first; nothing is updated: methods with state never batch)."""
        if self.batched is False:
            return
        s_mine = self._mine(s_all)
        try:
            batched = self._batched(s_mine, t_out, y, epoch)
            own = self._one_by_one(s_mine, t_out, y, epoch, index)
            for k in self.keys:  # not torch.testing.assert_close: it imports torch.distributed and sympy (0.4 s)
                b, o = batched[k].float(), own[k].float()
                if b.shape != o.shape or not torch.allclose(b, o, rtol=1e-4, atol=1e-6):
                    raise ValueError(f"its batched {k} is not its members' own")
        except Exception as e:  # noqa: BLE001 - any failure means: compute each member's loss on its own
            self.batched, self.why = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            return
        self.batched = True

    def _one_by_one(self, s_mine: Outputs, t_out, y, epoch: int, index: SampleIndex) -> dict:
        extra = {"index": index} if self.needs_index else {}
        terms = []
        for j, r in enumerate(self.runs):
            s_j = Outputs(*(None if o is None else o[j] for o in s_mine))
            terms.append(functional_call(r.m.method, {n: p[j] for n, p in self.params.items()}, (s_j, t_out, y, epoch),
                                         extra))
        return {k: torch.stack([t[k] for t in terms]) for k in self.keys}

    def _batched(self, s_mine: Outputs, t_out, y, epoch: int) -> dict:
        method = self.runs[0].m.method

        def one(params, hp, s):
            own, method.hp = method.hp, hp  # the hyperparameters vmap hands this member (one trace for all)
            try:
                return functional_call(method, params, (s, t_out, y, epoch))
            finally:
                method.hp = own

        hp_dims = {k: 0 if isinstance(v, torch.Tensor) else None for k, v in self.hp.items()}
        s_dims = Outputs(*(None if o is None else 0 for o in s_mine))
        return vmap(one, in_dims=(0, hp_dims, s_dims), randomness="error")(self.params, self.hp, s_mine)

    def zero(self, device: torch.device) -> None:
        self.sums = {k: torch.zeros(len(self.runs), device=device) for k in self.keys}

    def keep(self, live: list[int]) -> bool:
        """Keep the members whose group positions are in `live` (renumbered in order); False if none is left."""
        mine = [j for j, i in enumerate(self.pos) if i in live]
        if not mine:
            return False
        if len(mine) < len(self.runs):
            self.runs = [self.runs[j] for j in mine]
            self.params = {n: _stack([p[j] for j in mine]).requires_grad_() for n, p in self.params.items()}
            if self.opt is not None:
                self.opt.keep(mine)
            self.hp = self._batched_hp()
            self._unless_alone()
        self.pos = [live.index(i) for i in self.pos if i in live]
        return True


def _copy_state(opt: FusedOptimizer, runs: list, tensors) -> None:
    """The members' optimiser state so far (after the probe step) into `opt`, tensor by tensor; `tensors(run)`:
    the member's tensors in the order of `opt`'s leaves."""
    with torch.no_grad():
        for i, r in enumerate(runs):
            for j, p in enumerate(tensors(r)):
                for n, bufs in opt.state.items():
                    if r.opt.state.get(p, {}).get(n) is not None:
                        bufs[j][i].copy_(r.opt.state[p][n])


class FusedGroup:
    """K lockstep members (train._Run) of one fusion key, stepping as one; see the module's docstring.

    Made after the members' first step (`steps_done` = 1), from their modules and optimiser state;
    `batch` is that step's (x, y, teacher outputs, epoch, index), on which the stacked forward is tried
    (NotFusable if vmap cannot run it) and each method's members choose whether their losses batch.
    """

    def __init__(self, runs: list, device: torch.device, total_steps: int, steps_done: int, batch: tuple):
        by_method: dict[tuple, list] = {}
        for r in runs:  # each method's members side by side: its heads read one slice of the stacked outputs
            by_method.setdefault(head_key(r), []).append(r)
        self.runs, self.device = [r for rs in by_method.values() for r in rs], device
        first = self.runs[0]
        self.needs = frozenset().union(*(r.needs for r in self.runs))  # every member's taps, computed once for all
        self.fmt = first.fmt
        adaptors = [_Taps(r.m.student, self.needs) for r in self.runs]
        self.base = adaptors[0]  # functional_call's module: its own tensors are swapped for the stacked ones
        self.params, self.buffers = stack_module_state(adaptors)
        x, y, t_out, epoch, index = batch
        outs, why = self._try_forward(x)
        if why is not None:
            raise NotFusable(f"torch.func.vmap cannot run {type(first.m.student).__name__}: {why}")
        self.heads, at = [], 0
        for rs in by_method.values():
            self.heads.append(_Heads(rs, list(range(at, at + len(rs))), total_steps, steps_done))
            at += len(rs)
        taps = dict(zip(self.base.names, outs))
        for h in self.heads:
            h.choose(Outputs(*(taps.get(n) for n in TAPS)), t_out, y, epoch, index)
        self.opt = FusedOptimizer(first.m.schedule.optimizer, list(self.params.values()),
                                  [r.m.schedule for r in self.runs], total_steps, steps_done)
        _copy_state(self.opt, self.runs, lambda r: list(r.m.student.parameters()))
        self.correct = torch.stack([r.correct for r in self.runs])

    @property
    def sums(self) -> dict[tuple[int, str], torch.Tensor]:
        """The epoch's loss-term sums so far, (method set, term) -> (K_m,) tensor."""
        return {(j, k): v for j, h in enumerate(self.heads) for k, v in h.sums.items()}

    def leaves(self) -> list[torch.Tensor]:
        """The stacked trainable tensors: the students' (as `_Taps` names them), then each method set's heads."""
        return [*self.params.values(), *(p for h in self.heads for p in h.params.values())]

    def _try_forward(self, x: torch.Tensor) -> tuple[tuple | None, str | None]:
        """The stacked students' taps on `x` and None, or None and why they cannot run under vmap; tried on
        copies of the buffers."""
        try:
            with torch.no_grad(), autocast(self.device):
                outs = vmap(self._forward, in_dims=(0, 0, None), randomness="error")(
                    self.params, {n: b.clone() for n, b in self.buffers.items()}, x)
        except Exception as e:  # noqa: BLE001 - any failure means: train these members one by one
            return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return outs, None

    def _forward(self, params, buffers, x):
        return functional_call(self.base, (params, buffers), (x,))

    def step(self, x: torch.Tensor, y: torch.Tensor, t_out: Outputs | None, epoch: int, index: SampleIndex) -> None:
        """One training step of all K members: no host synchronisation, no data-dependent shapes."""
        students = list(self.params.values())
        with autocast(self.device):
            outs = vmap(self._forward, in_dims=(0, 0, None), randomness="error")(self.params, self.buffers, x)
            taps = dict(zip(self.base.names, outs))
            s_all = Outputs(*(taps.get(n) for n in TAPS))
            per_set = [h.losses(s_all, t_out, y, epoch, index) for h in self.heads]
        heads = [list(h.params.values()) for h in self.heads]
        total = sum(losses.sum() for _, losses in per_set)
        grads = torch.autograd.grad(total, [*students, *(p for hs in heads for p in hs)], allow_unused=True)
        self.opt.step(students, grads[:len(students)])
        at = len(students)
        for h, hs in zip(self.heads, heads):
            if h.opt is not None:
                h.opt.step(hs, grads[at : at + len(hs)])
            at += len(hs)
        with torch.no_grad():
            b = len(y)
            for h, (terms, _) in zip(self.heads, per_set):
                for k in h.keys:
                    h.sums[k] += terms[k].detach().float() * b
            self.correct += (s_all.logits.argmax(-1) == y).sum(1)

    def compiled_step(self, **compile_kw):
        """`step` under torch.compile, with autograd.grad traced into the graph where this torch can."""
        fn = torch.compile(self.step, **compile_kw)
        cfg = torch._dynamo.config
        if not hasattr(cfg, "trace_autograd_ops"):
            return fn

        def call(*args, **kw):
            with cfg.patch(trace_autograd_ops=True):
                return fn(*args, **kw)

        return call

    def begin_epoch(self, steps: int) -> None:
        """Drop members that stopped; zero the statistics; set each member's learning rate for its history
        (`steps`: the updates taken so far, known to the caller without reading the device)."""
        live = [i for i, r in enumerate(self.runs) if r.alive]
        if len(live) < len(self.runs) and live:
            self._keep(live)
        for h in self.heads:
            h.zero(self.device)
        self.correct = torch.zeros(len(self.runs), device=self.device)
        for r in self.runs:  # as loop.py's LambdaLR computes it, in Python floats
            r.lr_now = r.m.schedule.lr * 0.5 * (1 + math.cos(math.pi * steps / self.opt.total))

    def _keep(self, idx: list[int]) -> None:
        self.runs = [self.runs[i] for i in idx]
        self.base = _Taps(self.runs[0].m.student, self.needs)
        self.params = {n: _stack([p[i] for i in idx]).requires_grad_() for n, p in self.params.items()}
        self.buffers = {n: _stack([b[i] for i in idx]) for n, b in self.buffers.items()}
        self.heads = [h for h in self.heads if h.keep(idx)]
        self.opt.keep(idx)

    @property
    def alive(self) -> bool:
        return any(r.alive for r in self.runs)

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Copy the stacked state back into each member's modules; hand each member its epoch statistics."""
        for i, r in enumerate(self.runs):
            a = _Taps(r.m.student, self.needs)
            for n, p in a.named_parameters():
                p.copy_(self.params[n][i])
            for n, b in a.named_buffers():
                b.copy_(self.buffers[n][i])
            r.correct = self.correct[i]
        for h in self.heads:
            for j, r in enumerate(h.runs):
                for n, p in r.m.method.named_parameters():
                    p.copy_(h.params[n][j])
                r.sums = {k: h.sums[k][j] for k in h.keys}


def split(runs: list, n: int, cost: Callable[[Any], float]) -> list[list]:
    """`runs` in `n` groups that cost about the same, each member weighed by `cost` (`_deal`): the groups step
    side by side, each waiting for the slowest. Members of equal cost are dealt in turn, in method order, so
    each group gets its share of every method (its losses stay batched)."""
    methods = list(dict.fromkeys(map(head_key, runs)))
    return _deal(sorted(runs, key=lambda r: methods.index(head_key(r))), n, cost)


def plan(runs: Sequence, min_size: int) -> list[list]:
    """The runs to fuse, as lists of equal fusion keys with at least `min_size` members (in the group's order)."""
    by_key: dict[tuple, list] = {}
    for r in runs:
        by_key.setdefault(fusion_key(r), []).append(r)
    return [rs for rs in by_key.values() if len(rs) >= min_size]
