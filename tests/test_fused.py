"""Fused lockstep students (kdsweep/fused.py) train exactly as separate trials do, up to float rounding.

CPU only, on the bundled digits data (a few hundred images, 2-3 epochs): the fused path is forced on
with Accel(fused=True) (on CPU it is off by default).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from kdsweep.common import native
from kdsweep.data.dispatch import load_data
from kdsweep.methods.registry import METHODS, get_method
from kdsweep.models.factory import build_model
from kdsweep.training.devices import Accel
from kdsweep.training.fused import _ADAM, FusedOptimizer
from kdsweep.training.loop import (
    Lockstep,
    Member,
    Schedule,
    train_students,
)

CPU = torch.device("cpu")
TOL = 1e-5  # relative and absolute, on per-epoch losses and accuracies
# Both paths run NCHW: the fused (vmapped) convolutions round like NCHW ones, and over a few epochs of
# a sharp loss (rkd, dkd at lr 0.1) toggling --channels-last alone moves losses by ~1e-4 (docs/performance.md).
NCHW = dict(channels_last=False)


class Stop(Exception):
    """A test stand-in for optuna.TrialPruned."""


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(2)
    return load_data("digits", None, 400, 0, 0.2, CPU)


@pytest.fixture(scope="module")
def teacher(data):
    torch.manual_seed(1)
    return build_model("digitnet_l", data.in_shape, data.num_classes).eval().requires_grad_(False)


def member(data, teacher, method="vanilla_kd", lr=0.05, student="digitnet_s", seed=0, epochs=2, optimizer="sgd",
           momentum=0.9, weight_decay=5e-4, prune_after=None, hp_scale=1.0) -> Member:
    """`hp_scale`: the method's hyperparameters are its defaults times this, within their ranges."""
    torch.manual_seed(seed)
    s = build_model(student, data.in_shape, data.num_classes)
    cls = get_method(method)
    hp = {k: min(max(v.default * hp_scale, v.low), v.high) for k, v in cls.space.items()}
    m = cls(hp, s.shapes(data.in_shape), teacher.shapes(data.in_shape), epochs)
    def prune(stats):
        if stats.epoch + 1 >= prune_after:
            raise Stop(f"pruned after epoch {stats.epoch + 1}")

    on_epoch = prune if prune_after is not None else None
    sched = Schedule(epochs, 32, lr, momentum, weight_decay, optimizer)
    return Member(s, m, sched, on_epoch, rng=(torch.get_rng_state(), None))  # the stream it would train on alone


def curve(result):
    return [(h.train["loss"], h.train["acc"], h.val_loss, h.val_acc, h.lr) for h in result.history]


def close(a, b, tol=TOL):
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def assert_same(seq, fused, acc_tol=TOL):
    """`acc_tol`: how far accuracies may differ (a sample's share allows one prediction at a near-tie to flip)."""
    assert type(seq.stopped_by) is type(fused.stopped_by)
    assert len(seq.history) == len(fused.history)
    for ea, eb in zip(curve(seq), curve(fused)):
        tols = (TOL, acc_tol, TOL, acc_tol, TOL)
        assert all(close(x, y, t) for x, y, t in zip(ea, eb, tols)), (curve(seq), curve(fused))
    for ha, hb in zip(seq.history, fused.history):
        assert ha.train.keys() == hb.train.keys()
        assert all(close(ha.train[k], hb.train[k], acc_tol if k == "acc" else TOL) for k in ha.train)
    assert seq.best_epoch == fused.best_epoch
    # the best epoch's snapshot is an ordinary state_dict of the student and heads, equal to the sequential one
    for part in ("student", "heads"):
        assert seq.state.get(part, {}).keys() == fused.state.get(part, {}).keys()
        for k, v in seq.state.get(part, {}).items():
            torch.testing.assert_close(fused.state[part][k].float(), v.float(), rtol=1e-3, atol=1e-4)


def sequential(data, teacher, specs):
    """Each spec trained alone, one after another (the K = 1 path, fusion off)."""
    out = []
    for kw in specs:
        (r,) = train_students([member(data, teacher, **kw)], teacher, data, accel=Accel(fused=False, **NCHW), stop_on=(Stop,))
        out.append(r)
    return out


def fused(data, teacher, specs, **accel):
    group = Lockstep([member(data, teacher, **kw) for kw in specs], teacher, data, accel=Accel(fused=True, **{**NCHW, **accel}),
                     stop_on=(Stop,))
    while group.epoch():
        pass
    return group


CASES = {
    # K = 1: one student, fused with itself
    1: [dict(lr=0.05)],
    # K = 3: batch norm (digitnet_s) twice, and a member with dropout (mlp1200: p = 0.5), which draws random
    # numbers and so keeps stepping alone with its own RNG stream
    3: [dict(lr=0.05), dict(lr=0.2, seed=3), dict(lr=0.1, student="mlp1200")],
    # K = 8: a member pruned mid-study (after epoch 2 of 3) and one diverging (lr 1e6), among six that run on
    8: [dict(lr=0.05, epochs=3), dict(lr=0.1, epochs=3, seed=1), dict(lr=1e6, epochs=3),
        dict(lr=0.02, epochs=3, prune_after=2), dict(lr=0.2, epochs=3, seed=2), dict(lr=0.08, epochs=3, momentum=0.5),
        dict(lr=0.03, epochs=3, weight_decay=0.0), dict(lr=0.1, epochs=3, student="mlp1200")],
}
FUSED = {1: 1, 3: 2, 8: 7}  # members on the fused path (the dropout members are not)


@pytest.mark.parametrize("k", sorted(CASES))
def test_fused_lockstep_equals_sequential(data, teacher, k):
    specs = CASES[k]
    alone = sequential(data, teacher, specs)
    group = fused(data, teacher, specs)
    assert group.fused_members == FUSED[k], group.notes
    for spec, a, f in zip(specs, alone, group.results()):
        assert_same(a, f)
        if spec.get("lr") == 1e6:
            assert type(f.stopped_by).__name__ == "NonFiniteLoss" and f.history == []
        elif "prune_after" in spec:
            assert isinstance(f.stopped_by, Stop) and len(f.history) == spec["prune_after"]
        else:
            assert f.stopped_by is None and len(f.history) == spec.get("epochs", 2)


# Methods whose loss is computed for all their members in one vmapped forward, hyperparameters as (K,) tensors;
# the others keep state per member (buffers, a memory bank) and compute one member at a time.
ONE_BY_ONE = {"crd", "feature_mse", "fitnet"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_members_with_different_hyperparameters_share_one_loss_pass(data, teacher, method):
    """Three members of one method, each with its own hyperparameters: their losses are computed together (the
    hyperparameters batched) and each trains exactly as alone."""
    specs = [dict(method=method, lr=0.05, hp_scale=0.8), dict(method=method, lr=0.1, seed=5),
             dict(method=method, lr=0.02, seed=6, hp_scale=1.25)]
    alone = sequential(data, teacher, specs)
    group = fused(data, teacher, specs)
    (g,) = group.groups
    (heads,) = g.heads
    assert heads.batched is (method not in ONE_BY_ONE), heads.why
    one_sample = 1 / min(data.n_train, len(data.val_y))
    for a, f in zip(alone, group.results()):
        # A hyperparameter as a tensor rounds as a Python float does, except that torch divides by a Python
        # float as a multiplication by its reciprocal: the last bit may differ, and after two epochs at lr 0.1
        # one prediction at a near-tie may flip (pkt_seed003's 1 / sigma); the losses stay within TOL.
        assert_same(a, f, acc_tol=one_sample)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_fused_adam_lockstep_equals_sequential(data, teacher, optimizer):
    specs = [dict(lr=1e-3, optimizer=optimizer), dict(lr=3e-3, optimizer=optimizer, momentum=0.8, weight_decay=0.01)]
    alone = sequential(data, teacher, specs)
    group = fused(data, teacher, specs)
    assert [len(g.runs) for g in group.groups] == [2]
    for a, f in zip(alone, group.results()):
        assert_same(a, f)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_fuses(data, teacher, method):
    specs = [dict(method=method, lr=0.05), dict(method=method, lr=0.1, seed=5)]
    alone = sequential(data, teacher, specs)
    group = fused(data, teacher, specs)
    assert [len(g.runs) for g in group.groups] == [2], group.notes
    for a, f in zip(alone, group.results()):
        assert_same(a, f)


def test_members_of_different_methods_fuse_into_one_group(data, teacher):
    """A sweep's group: trials of several methods (with and without heads, teacher and sample index) stack their
    students into one fused model; each trains as it would alone, one of them pruned on the way."""
    specs = [dict(method="ce", lr=0.05), dict(method="vanilla_kd", lr=0.1, seed=1), dict(method="fitnet", lr=0.05),
             dict(method="crd", lr=0.05, seed=2), dict(method="pkt", lr=0.1), dict(method="fitnet", lr=0.1, seed=3),
             dict(method="dkd", lr=0.05, epochs=3, prune_after=2), dict(method="ce", lr=0.2, seed=4)]
    specs = [{"epochs": 3, **spec} for spec in specs]
    alone = sequential(data, teacher, specs)
    group = fused(data, teacher, specs, cpu_workers=1)
    assert group.fused_members == 8 and len(group.groups) == 1, group.notes  # (the pruned member has left it since)
    assert {type(r.m.method).__name__ for r in group.groups[0].runs} == {"CE", "VanillaKD", "FitNet", "CRD", "PKT"}
    # A method with one member computes its loss as alone (nothing to batch); ce's two members share one pass.
    assert {h.runs[0].m.method.name: (len(h.runs), h.batched) for h in group.groups[0].heads} == {
        "ce": (2, True), "vanilla_kd": (1, False), "fitnet": (2, False), "crd": (1, False), "pkt": (1, False)}
    for spec, a, f in zip(specs, alone, group.results()):
        assert_same(a, f)
        assert len(f.history) == spec.get("prune_after", 3)


def test_a_method_whose_members_all_stop_leaves_the_group_to_the_others(data, teacher):
    """Both members of a method with heads (fitnet's regressor) are pruned after epoch 1: its stacked heads go,
    and the others train on in the same group, each as alone."""
    specs = [dict(method="ce", lr=0.05, epochs=3), dict(method="fitnet", lr=0.05, epochs=3, prune_after=1),
             dict(method="fitnet", lr=0.1, epochs=3, seed=1, prune_after=1), dict(method="ce", lr=0.1, epochs=3, seed=2)]
    alone = sequential(data, teacher, specs)
    group = fused(data, teacher, specs, cpu_workers=1)
    assert [len(g.runs) for g in group.groups] == [2] and len(group.groups[0].heads) == 1, group.notes
    for spec, a, f in zip(specs, alone, group.results()):
        assert_same(a, f)
        assert len(f.history) == spec.get("prune_after", 3)


def test_with_worker_threads_members_fuse_into_one_group_per_thread(data, teacher, monkeypatch):
    """On CPU with two worker threads, the members of one architecture go into two fused groups that step side by
    side, each with its share of every method (their losses stay batched, where members cost the same: their
    first steps' times are set equal here); each member trains as it would alone."""
    from kdsweep.training import loop

    monkeypatch.setattr(loop, "_first_step", lambda r: 1.0)
    specs = [dict(method=m, lr=lr, seed=i) for i, (m, lr) in
             enumerate([("ce", 0.05), ("pkt", 0.1), ("ce", 0.1), ("pkt", 0.05), ("vanilla_kd", 0.1), ("ce", 0.02)])]
    alone = sequential(data, teacher, specs)
    group = fused(data, teacher, specs, cpu_workers=2)
    assert group.fused_members == 6 and [len(g.runs) for g in group.groups] == [3, 3], group.notes
    for g in group.groups:
        assert {type(r.m.method).__name__ for r in g.runs} >= {"CE", "PKT"}
    for a, f in zip(alone, group.results()):
        assert_same(a, f)


@pytest.mark.parametrize("costs, hands", [
    ([30, 1, 1, 1, 1, 10, 8, 1, 1], [[0], [1, 2, 3, 4, 5, 6, 7, 8]]),  # crd alone; the rest (rkd's two forms too) beside it
    ([1, 1, 1, 1, 1], [[0, 2, 4], [1, 3]]),  # equal costs: dealt in turn, as without costs
    ([5, 4, 3, 3], [[0, 3], [1, 2]]),
])
def test_members_are_dealt_to_threads_and_groups_by_what_they_cost(costs, hands):
    """Hands step side by side and each waits for the slowest: the costliest member first, each to the hand that
    costs least so far (a confirmation group of MNIST-1D's 15 methods: crd's step costs 100x ce's)."""
    from kdsweep.training.devices import _deal

    assert _deal(list(range(len(costs))), 2, cost=lambda i: costs[i]) == hands
    assert _deal(list(range(len(costs))), 2) == [list(range(len(costs)))[0::2], list(range(len(costs)))[1::2]]


@pytest.mark.parametrize("kind, path", [("sgd", "torch"), ("adam", "torch"), ("adamw", "torch"), ("adam", "c"),
                                        ("adamw", "c")])
def test_fused_optimizer_matches_torch_optim(kind, path, monkeypatch):
    """Three members, each with its own lr, momentum / beta1 and weight decay, under the cosine schedule; Adam's
    update in torch's ops or, on a CPU, in C (fused_adam.c; 1 - beta1 below and above 1/2 runs both forms of
    lerp)."""
    if path == "torch":
        monkeypatch.setenv(native.ENV, "0")
    elif _ADAM.library() is None:
        pytest.skip("the C kernel is not built here (no C compiler?)")
    assert _ADAM.usable_for(CPU) == (path == "c")
    torch.manual_seed(0)
    scheds = [Schedule(1, 8, lr, m, wd, kind) for lr, m, wd in ((0.1, 0.9, 5e-4), (0.03, 0.5, 0.0), (0.2, 0.0, 1e-2))]
    total = 7
    w = [torch.randn(4, 3) for _ in scheds]
    ref = [torch.nn.Parameter(t.clone()) for t in w]
    opts = [torch.optim.SGD([p], lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay) if kind == "sgd" else
            (torch.optim.Adam if kind == "adam" else torch.optim.AdamW)([p], lr=s.lr, betas=(s.momentum, 0.999),
                                                                        weight_decay=s.weight_decay)
            for p, s in zip(ref, scheds)]
    lrs = [torch.optim.lr_scheduler.LambdaLR(o, lambda i: 0.5 * (1 + math.cos(math.pi * i / total))) for o in opts]
    stacked = torch.stack(w).requires_grad_()
    opt = FusedOptimizer(kind, [stacked], scheds, total)
    for _ in range(total):
        g = torch.randn(3, 4, 3)
        for i, (p, o, sch) in enumerate(zip(ref, opts, lrs)):
            p.grad = g[i].clone()
            o.step()
            sch.step()
        opt.step([stacked], [g])
        torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in ref]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("durations, calls, seconds", [
    ([5.0, 1.0, 1.0], 2, 5.0),   # over twice the other path's 2 s: clearly slower, no more steps spent on it
    ([1.5, 1.0, 1.0], 2, 1.5),   # faster than the other path: clearly faster
    ([3.0, 2.5, 2.2], 4, 2.2),   # in between: all three timed calls, the fastest counts
])
def test_measuring_a_path_stops_once_the_answer_is_clear(monkeypatch, durations, calls, seconds):
    from kdsweep.training import loop

    clock, made = iter([t for d in durations for t in (0.0, d)]), []  # each timed call reads the clock twice
    with monkeypatch.context() as m:
        m.setattr(loop.time, "perf_counter", lambda: next(clock))
        measured = loop._seconds_a_step(lambda: made.append(1), against=2.0)
    assert measured == seconds
    assert len(made) == calls  # the untimed warm-up call, then the timed ones



@pytest.mark.parametrize("pays", [False, True])
def test_on_cpu_the_default_fuses_where_fusing_measured_faster(data, teacher, monkeypatch, tmp_path, pays):
    """No fixed rule on CPU: the group fuses its members only if fusing measured faster (which one wins is
    the machine's business, not a test's: here the measurement's verdict is given)."""
    from kdsweep.training import loop

    verdicts = iter([1.5, 1.0 if pays else 2.0])  # seconds a step: worker threads first, then fused

    def seconds_a_step(step, repeats=3, against=None):
        step()  # the copies do take their step
        return next(verdicts)

    monkeypatch.setattr(loop, "_seconds_a_step", seconds_a_step)
    monkeypatch.setattr(loop, "_FUSING_PAYS", {})
    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path))  # nothing measured on this machine yet
    timed = []
    real = loop.Lockstep._fusing_pays

    def fusing_pays(self, runs, xs, batch):
        timed.append(len(runs))
        return real(self, runs, xs, batch)

    monkeypatch.setattr(loop.Lockstep, "_fusing_pays", fusing_pays)
    specs = [dict(lr=0.05), dict(lr=0.1, seed=1)]
    group = Lockstep([member(data, teacher, **kw) for kw in specs], teacher, data, accel=Accel(**NCHW))
    while group.epoch():
        pass
    assert timed == [2]
    assert (group.fused_members == 2) is pays, group.notes
    assert any("ms a step" in n for n in group.notes)
    for a, f in zip(sequential(data, teacher, specs), group.results()):
        assert_same(a, f)  # the measurement trained copies: the members themselves are untouched by it


def _fake_timings(monkeypatch, loop, threads: float, fused: float) -> list:
    """`_seconds_a_step` gives these seconds (threads first, then fused); returns the list of calls made."""
    calls, verdicts = [], iter([threads, fused])

    def seconds_a_step(step, repeats=3, against=None):
        step()
        calls.append(1)
        return next(verdicts)

    monkeypatch.setattr(loop, "_seconds_a_step", seconds_a_step)
    return calls


def _group(data, teacher, workers=None):
    specs = [dict(lr=0.05), dict(lr=0.1, seed=1)]
    accel = Accel(**NCHW) if workers is None else Accel(cpu_workers=workers, **NCHW)
    return Lockstep([member(data, teacher, **kw) for kw in specs], teacher, data, accel=accel)


def test_the_fusing_measurement_is_kept_for_the_next_process(data, teacher, monkeypatch, tmp_path):
    """What one process measured, the next one reads instead of measuring again (it cost ~13 s of `kdsweep
    bench` on 2 cores), and takes the same path; another question (other worker threads) is measured anew."""
    from kdsweep.training import fusing_memo, loop

    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path))
    monkeypatch.setattr(loop, "_FUSING_PAYS", {})
    calls = _fake_timings(monkeypatch, loop, threads=1.5, fused=1.0)
    first = _group(data, teacher)
    first.epoch()
    assert len(calls) == 2 and first.fused_members == 2
    kept = list(fusing_memo.folder().glob("*.json"))
    assert len(kept) == 1

    monkeypatch.setattr(loop, "_FUSING_PAYS", {})  # a new process: only the file remembers
    calls = _fake_timings(monkeypatch, loop, threads=9.0, fused=9.0)
    second = _group(data, teacher)
    second.epoch()
    assert calls == [] and second.fused_members == 2, second.notes
    assert any("as measured on this machine" in n and "fused 1000.0 ms a step, threads 1500.0 ms" in n
               for n in second.notes), second.notes

    other = _group(data, teacher, workers=1 if first.workers != 1 else 2)
    calls = _fake_timings(monkeypatch, loop, threads=1.0, fused=2.0)
    other.epoch()
    assert len(calls) == 2 and other.fused_members == 0
    assert len(list(fusing_memo.folder().glob("*.json"))) == 2


def test_a_fusing_answer_measured_on_a_busy_machine_is_measured_again_when_it_is_quiet(data, teacher, monkeypatch,
                                                                                     tmp_path):
    """Contention can reverse which path wins: an answer kept at load 9 on 2 cores is not final. A process that
    finds the machine quiet measures again and keeps its answer; one that finds it still busy recalls."""
    from kdsweep.training import fusing_memo, loop

    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path))
    monkeypatch.setattr(fusing_memo.processes, "cores", lambda: 2)
    load = [9.0]
    monkeypatch.setattr(fusing_memo.os, "getloadavg", lambda: (load[0], load[0], load[0]))
    monkeypatch.setattr(loop, "_FUSING_PAYS", {})
    _fake_timings(monkeypatch, loop, threads=1.0, fused=2.0)
    _group(data, teacher).epoch()
    (kept,) = fusing_memo.folder().glob("*.json")
    assert json.loads(kept.read_text())["fused"] is False

    load[0] = 3.0  # still busy: the kept answer stands
    monkeypatch.setattr(loop, "_FUSING_PAYS", {})
    calls = _fake_timings(monkeypatch, loop, threads=1.5, fused=1.0)
    busy = _group(data, teacher)
    busy.epoch()
    assert calls == [] and busy.fused_members == 0, busy.notes

    load[0] = 0.5  # quiet: measured again, and the new answer kept
    monkeypatch.setattr(loop, "_FUSING_PAYS", {})
    calls = _fake_timings(monkeypatch, loop, threads=1.5, fused=1.0)
    quiet = _group(data, teacher)
    quiet.epoch()
    assert len(calls) == 2 and quiet.fused_members == 2, quiet.notes
    assert any("measured again: the kept answer was measured at load 9.0 on 2 cores, the load is 0.5 now" in n
               for n in quiet.notes), quiet.notes
    assert json.loads(kept.read_text())["fused"] is True and json.loads(kept.read_text())["load"][0] == 0.5

    monkeypatch.setattr(loop, "_FUSING_PAYS", {})  # measured quiet: recalled from now on
    calls = _fake_timings(monkeypatch, loop, threads=9.0, fused=9.0)
    later = _group(data, teacher)
    later.epoch()
    assert calls == [] and later.fused_members == 2, later.notes


def test_a_corrupt_or_unwritable_fusing_memo_only_costs_a_measurement(data, teacher, monkeypatch, tmp_path):
    from kdsweep.training import fusing_memo, loop

    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path))
    monkeypatch.setattr(loop, "_FUSING_PAYS", {})
    _fake_timings(monkeypatch, loop, threads=1.5, fused=1.0)
    _group(data, teacher).epoch()
    (kept,) = fusing_memo.folder().glob("*.json")
    kept.write_text('{"question": ')  # half a file, as a disk-full write would leave

    monkeypatch.setattr(loop, "_FUSING_PAYS", {})
    calls = _fake_timings(monkeypatch, loop, threads=1.0, fused=2.0)
    group = _group(data, teacher)
    group.epoch()
    assert len(calls) == 2 and group.fused_members == 0
    assert json.loads(kept.read_text())["fused"] is False  # measured again and rewritten whole

    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "file"))
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(loop, "_FUSING_PAYS", {})
    _fake_timings(monkeypatch, loop, threads=1.5, fused=1.0)
    group = _group(data, teacher)
    while group.epoch():
        pass
    assert group.fused_members == 2
    assert any("could not keep the measurement" in n for n in group.notes), group.notes

def batch(data, teacher, needs):
    from kdsweep.methods.base import SampleIndex
    from kdsweep.training.loop import run_taps

    x, y, ids = next(iter(data.epoch(0, 32, index=True)))
    with torch.no_grad():
        t = run_taps(teacher, x, needs)
    return x, y, t, SampleIndex(ids, data.n_train)


@pytest.mark.slow  # torch.compile of every method: minutes on 2 cores; fusing every method stays in the default tier
@pytest.mark.parametrize("method", sorted(METHODS))
def test_fused_step_compiles_without_graph_breaks(data, teacher, method):
    """One whole fused step - K students' forward, the K losses, backward, the fused optimiser update - is one
    graph (fullgraph=True raises on any graph break), and computes what the eager step computes."""
    specs = [dict(method=method, lr=0.05), dict(method=method, lr=0.1, seed=5), dict(method=method, lr=0.02, seed=6)]
    twins = []
    for _ in range(2):
        g = Lockstep([member(data, teacher, **kw) for kw in specs], teacher, data, accel=Accel(fused=True),
                     stop_on=(Stop,))
        g.epoch()  # the first step (the probe) forms the group; then a whole epoch of fused steps
        (fg,) = g.groups
        twins.append(fg)
    eager, compiled = twins
    torch._dynamo.reset()  # each test's group is a new object: no recompile limit carried over from the last test
    x, y, t, index = batch(data, teacher, eager.needs)
    step = compiled.compiled_step(fullgraph=True, backend="aot_eager")
    for _ in range(2):
        eager.step(x, y, t, 1, index)
        step(x, y, t, 1, index)
    for a, b in zip(eager.leaves(), compiled.leaves()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for n in eager.buffers:
        torch.testing.assert_close(eager.buffers[n], compiled.buffers[n], rtol=1e-5, atol=1e-6)


def test_fused_flag_in_a_study(kdsweep, workdir):
    """`--fused` reaches the trainer from the CLI; a fused --parallel study asks the same trials and scores them the same."""
    import mlflow
    import optuna

    (workdir / "mlruns").mkdir()
    storage, uri = f"sqlite:///{workdir}/mlruns/optuna.db", f"sqlite:///{workdir}/mlruns/mlflow.db"
    common = ("--dataset", "digits", "--data-size", 300, "--trials", 3, "--epochs", 2, "--teacher-epochs", 1,
              "--device", "cpu", "--pruner", "none", "--parallel", 3, "--no-channels-last", "--storage", storage,
              "--tracking-uri", uri, "--quiet")
    for name, flag in (("on", "--fused"), ("off", "--no-fused")):
        code, _, err = kdsweep("study", "vanilla_kd", *common, "--study-name", name, flag)
        assert code == 0, err

    def trials(name):
        return {t.number: (t.params, t.value) for t in optuna.load_study(study_name=name, storage=storage).trials}

    on, off = trials("on"), trials("off")
    assert on.keys() == off.keys() and len(on) == 3
    for n in on:
        assert on[n][0] == off[n][0]
        assert math.isclose(on[n][1], off[n][1], abs_tol=1.01 / 60)  # at most one val image apart
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("kdsweep/digits/digitnet_l->digitnet_s").experiment_id
    for name, value in (("on", "True"), ("off", "False")):
        runs = client.search_runs([exp], filter_string=f"tags.`kdsweep.study` = '{name}' and tags.`kdsweep.role` = 'trial'")
        assert len(runs) == 3 and {r.data.params["fused"] for r in runs} == {value}
        assert {r.data.tags["kdsweep.state"] for r in runs} == {"COMPLETE"}


def test_students_vmap_cannot_run_train_one_by_one(data, teacher):
    """A student with data-dependent Python control flow cannot be vmapped: its members step alone, with a note."""
    from kdsweep.models.zoo import ConvNet

    class Branchy(ConvNet):
        def features(self, x):
            f = self.body(x)
            return f if bool(f.mean() > -1e9) else -f  # reads a value: fine alone, impossible under vmap

    def make(lr, seed):
        m = member(data, teacher, lr=lr, seed=seed)
        m.student.__class__ = Branchy
        return m

    (a,) = train_students([make(0.05, 0)], teacher, data, accel=Accel(fused=False, **NCHW))
    group = Lockstep([make(0.05, 0), make(0.1, 1)], teacher, data, accel=Accel(fused=True, **NCHW))
    while group.epoch():
        pass
    assert group.groups == [] and group.fused_members == 0
    assert len(group.notes) == 1 and "not fused" in group.notes[0] and "vmap" in group.notes[0]
    assert_same(a, group.results()[0])


def test_a_fused_member_that_starts_drawing_random_numbers_is_refused(data, teacher):
    """The first step found it deterministic; drawing later would desynchronise its stream: an error, not a silent change."""
    class LateNoise(get_method("vanilla_kd")):
        def forward(self, s, t, y, epoch):
            out = super().forward(s, t, y, epoch)
            if epoch >= 1:
                out["noise"] = 0 * torch.rand(())
            return out

    members = [member(data, teacher), member(data, teacher, lr=0.1)]
    for m in members:
        m.method.__class__ = LateNoise
    group = Lockstep(members, teacher, data, accel=Accel(fused=True, **NCHW))
    group.epoch()
    assert group.fused_members == 2
    with pytest.raises(RuntimeError, match="drew random numbers after its first step"):
        group.epoch()


def test_a_fused_group_imports_no_sympy():
    """F.cross_entropy under vmap, and torch.testing.assert_close in the group's loss check, imported sympy on a
    fused group's first step: 0.35 s a process (issue 20, start-up). methods/softmax.py and _Heads.choose do not."""
    code = ("import sys, torch\n"
            "from kdsweep.data.dispatch import load_data\n"
            "from kdsweep.methods.registry import METHODS\n"
            "from kdsweep.models.factory import build_model\n"
            "from kdsweep.training.devices import Accel\n"
            "from kdsweep.training.loop import Lockstep, Member, Schedule\n"
            "d = load_data('digits', None, 200, 0, 0.2, torch.device('cpu'))\n"
            "t = build_model('digitnet_l', d.in_shape, d.num_classes).eval().requires_grad_(False)\n"
            "members = []\n"
            "for name in ['ce', 'vanilla_kd', 'ce', 'vanilla_kd']:\n"
            "    s = build_model('digitnet_s', d.in_shape, d.num_classes)\n"
            "    cls = METHODS[name]\n"
            "    m = cls({k: v.default for k, v in cls.space.items()}, s.shapes(d.in_shape), t.shapes(d.in_shape), 1)\n"
            "    members.append(Member(s, m, Schedule(1, 64, 0.05)))\n"
            "group = Lockstep(members, t, d, accel=Accel(cpu_workers=1, fused=True, channels_last=False))\n"
            "while group.epoch():\n"
            "    pass\n"
            "print(group.fused_members, all(h.batched for g in group.groups for h in g.heads), 'sympy' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["4", "True", "False"]  # fused, each method's losses batched under vmap, no sympy
