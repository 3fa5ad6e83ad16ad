"""No method, and no training step, makes the host wait for the device or has a data-dependent shape.

Each loss (with its backward), each ordinary training step (`loop._Run.step`: forward, loss, backward,
optimiser, schedule, statistics) and a fused step are traced to ATen graphs with
`make_fx(tracing_mode="real")`, which records every operation the CPU dispatches, including the ones
`torch.compile` never sees (F.one_hot's input check runs only on real tensors). A graph fails if it
reads a value back (`.item()`, `if tensor:`: `_local_scalar_dense`, which real-mode tracing refuses
outright) or has an output shape that depends on the data (`nonzero`, `masked_select`, `unique`,
indexing with a boolean mask, ...): on a GPU each stalls the launch queue and breaks graph capture.
The planted-fault tests show the checker catches each kind. Where CUDA exists, the same step also
runs under `torch.cuda.set_sync_debug_mode("error")` (tests/test_cuda.py, and the planted fault here).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from kdsweep.data.builtin import Augment, RawData
from kdsweep.data.device_data import DeviceData
from kdsweep.methods.base import SampleIndex
from kdsweep.methods.registry import METHODS
from kdsweep.models.factory import build_model
from kdsweep.models.zoo import Outputs
from kdsweep.training.devices import Accel
from kdsweep.training.loop import Lockstep, Member, Schedule

aten = torch.ops.aten
IN_SHAPE, CLASSES, BATCH, N_TRAIN = (1, 8, 8), 10, 6, 40
# Ops that read a value back to the host, or whose output shape depends on the values of their input.
SYNCING = {
    aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default,
    aten.nonzero.default, aten.argwhere.default, aten.masked_select.default,
    aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor, aten.bincount.default,
}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: exact sums, and quicker on a shared machine


def _dtype(gm: torch.fx.GraphModule, node) -> torch.dtype | None:
    if not isinstance(node, torch.fx.Node):
        return getattr(node, "dtype", None)
    if node.op == "get_attr":  # a tensor constant the trace captured
        return getattr(gm, node.target).dtype
    return getattr(node.meta.get("val"), "dtype", None)


def host_syncs(fn, *args) -> list[str]:
    """The operations of `fn(*args)` that sync with the host or have data-dependent shapes (empty: none)."""
    try:
        gm = make_fx(fn, tracing_mode="real")(*args)
    except RuntimeError as e:  # real-mode tracing refuses to read a traced tensor's value
        if "_local_scalar_dense" in str(e) or "data-dependent" in str(e):
            return ["aten._local_scalar_dense (a value read back to the host)"]
        raise
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in SYNCING:
            found.append(str(node.target))
        elif node.target in INDEXING and any(_dtype(gm, i) in (torch.bool, torch.uint8) for i in node.args[1] if i is not None):
            found.append(f"{node.target} with a boolean mask")
    return found


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return build_model("digitnet_l", IN_SHAPE, CLASSES).eval(), build_model("digitnet_s", IN_SHAPE, CLASSES)


def _method(name, teacher, student, epochs=4):
    cls = METHODS[name]
    return cls({k: v.default for k, v in cls.space.items()}, student.shapes(IN_SHAPE), teacher.shapes(IN_SHAPE), epochs)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_loss_and_its_backward_trace_without_a_host_sync(name, nets):
    teacher, student = nets
    m = _method(name, teacher, student)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, *IN_SHAPE, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)
    ids = torch.randperm(N_TRAIN, generator=g)[:BATCH]
    with torch.no_grad():
        t_out = teacher.taps(x)
    s_out = Outputs(*(None if v is None else v.detach().requires_grad_() for v in student.taps(x)))
    leaves = [v for v in s_out if v is not None] + list(m.parameters())

    def loss_and_grads(s_logits, s_feature, s_embedding, y, ids):
        extra = {"index": SampleIndex(ids, N_TRAIN)} if m.needs_index else {}
        loss = sum(m(Outputs(s_logits, s_feature, s_embedding), t_out, y, 1, **extra).values())
        return loss, torch.autograd.grad(loss, leaves, allow_unused=True)

    loss_and_grads(*s_out, y, ids)  # first use: lazily made state (crd's banks and normalisers), as in training
    assert host_syncs(loss_and_grads, *s_out, y, ids) == []


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n + 16, *IN_SHAPE), dtype=torch.uint8, generator=g)
    y = torch.randint(0, CLASSES, (n + 16,), generator=g)
    raw = RawData(x[:n], y[:n], x[n:], y[n:], (0.5,), (0.25,), CLASSES, Augment(pad=0, flip=False))
    return DeviceData(raw, 0, 0.1, torch.device("cpu"))


def _group(names, fused: bool):
    """A lockstep group of `names` with its first step (the probe, which makes lazy state and fused groups)
    taken, and the next batch with its teacher outputs."""
    data = _data()
    torch.manual_seed(0)
    teacher = build_model("digitnet_l", IN_SHAPE, CLASSES).eval().requires_grad_(False)
    members = []
    for name in names:
        student = build_model("digitnet_s", IN_SHAPE, CLASSES)
        members.append(Member(student, _method(name, teacher, student, 2), Schedule(2, 16, 0.05)))
    group = Lockstep(members, teacher, data, accel=Accel(fused=fused, cpu_workers=0))
    batches = list(data.epoch(0, 16, index=True))[:2]
    feeds = [group.feed(i, x, ids) if group.feed is not None else None for i, (x, _, ids) in enumerate(batches)]
    for r in group.runs:
        r.begin_epoch()
    x, y, ids = batches[0]
    group._steps(group.runs, {r.fmt: x for r in group.runs}, y, feeds[0], 0, SampleIndex(ids, data.n_train))
    x, y, ids = batches[1]
    return group, x, y, ids, feeds[1], data.n_train


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_training_step_traces_without_a_host_sync(name):
    group, x, y, ids, t_out, n = _group([name], fused=False)
    (run,) = group.runs

    def step(x, y, ids):
        run.step(x, y, t_out, 0, SampleIndex(ids, n))
        return [*run.sums.values(), run.correct]

    assert host_syncs(step, x, y, ids) == []


@pytest.mark.parametrize("name", ["crd", "dkd", "pkt_seed003"])
def test_a_fused_step_traces_without_a_host_sync(name):
    group, x, y, ids, t_out, n = _group([name, name], fused=True)
    assert [len(g.runs) for g in group.groups] == [2], group.notes
    (fused,) = group.groups

    def step(x, y, ids):
        fused.step(x, y, t_out, 0, SampleIndex(ids, n))
        return [*fused.sums.values(), fused.correct]

    assert host_syncs(step, x, y, ids) == []


# ---------------------------------------------------------------- the checker catches planted faults

def _item(z, y):
    return z.sum() * z.max().item()


def _branch(z, y):
    return z.sum() if z.sum() > 0 else -z.sum()


def _mask(z, y):
    return z[z > 0].sum()


def _mask_assign(z, y):
    z = z.clone()
    z[z < 0] = 0
    return z.sum()


def _one_hot(z, y):
    return (z * F.one_hot(y, z.shape[1])).sum()


def _unique(z, y):
    return z[:, y.unique()].sum()


@pytest.mark.parametrize("fault", [_item, _branch, _mask, _mask_assign, _one_hot, _unique])
def test_the_checker_catches_a_planted_sync(fault):
    z, y = torch.randn(4, 5), torch.tensor([0, 3, 1, 3])
    assert host_syncs(fault, z, y), f"{fault.__name__} was not caught"
    assert host_syncs(lambda z, y: (z * (y[:, None] == torch.arange(5))).sum(), z, y) == []  # the clean form


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_sync_debug_mode_catches_a_planted_sync_on_cuda():
    z = torch.randn(4, 5, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (z * (z > 0)).sum()  # static shapes: no sync
        with pytest.raises(RuntimeError):
            z.max().item()
    finally:
        torch.cuda.set_sync_debug_mode("default")
