"""Every method's loss compiles as one graph: no host sync, no data-dependent shape, no graph break.

A GPU runs a step at full speed only if the host never waits for the device inside it: `.item()`,
boolean-mask indexing (its output shape depends on the data) or Python branching on a tensor
value would each stall the launch queue, and each is a graph break that
`torch.compile(fullgraph=True)` refuses. The first call runs eagerly, as the trainer's first step
does (CRD makes its memory bank and fixes its normaliser there); the steady-state step is compiled.
"""

from __future__ import annotations

import pytest
import torch

from kdsweep.methods import rkd
from kdsweep.methods.base import SampleIndex
from kdsweep.methods.registry import METHODS
from kdsweep.models.factory import build_model

# torch.compile of every method: minutes on 2 cores. The default tier runs every loss eagerly (test_method_losses,
# test_method_fixture) and end to end (test_methods_e2e).
pytestmark = pytest.mark.slow

IN_SHAPE, CLASSES, BATCH, N_TRAIN = (1, 8, 8), 10, 6, 40


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    t, s = build_model("digitnet_l", IN_SHAPE, CLASSES).eval(), build_model("digitnet_s", IN_SHAPE, CLASSES)
    return t, s


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loss_and_backward_compile_without_graph_breaks(name, pair):
    teacher, student = pair
    cls = METHODS[name]
    method = cls({k: v.default for k, v in cls.space.items()}, student.shapes(IN_SHAPE), teacher.shapes(IN_SHAPE), 4)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, *IN_SHAPE, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)
    index = SampleIndex(torch.randperm(N_TRAIN, generator=g)[:BATCH], N_TRAIN)
    with torch.no_grad():
        t_out = teacher.taps(x)
    extra = {"index": index} if cls.needs_index else {}

    def loss_of(x, y, t_out):
        return sum(method(student.taps(x), t_out, y, 1, **extra).values())

    eager = loss_of(x, y, t_out)  # first use: lazily made state (memory banks, normalisers)
    eager.backward()
    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")  # its backward is compiled with it
    for _ in range(2):  # the second call also proves the state the first one left needs no other graph
        student.zero_grad()
        loss = compiled(x, y, t_out)
        loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(eager)
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# The angle term computes its own gradient (rkd._AngleLoss), so inductor compiles only its forward, and gets it right.
@pytest.mark.parametrize("term", [
    pytest.param("rkd_distance", marks=pytest.mark.xfail(
        strict=True, reason="torch 2.14's inductor on a CPU: rkd's distance gradients at a batch of 64 are far from "
        "eager's (docs/performance.md, 'torch.compile and rkd'); a pass means a torch that fixed it: drop this mark "
        "and the warning in --compile's help")),
    "rkd_angle"])
def test_rkd_terms_compiled_by_inductor_give_eager_gradients(term):
    fn = getattr(rkd, term)
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(64, 100, dtype=torch.float64, generator=g), torch.randn(64, 64, dtype=torch.float64, generator=g)

    def grad(f):
        z = z_s.clone().requires_grad_()
        f(z, z_t).backward()
        return z.grad

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a CPU trial's worker thread runs; the error depends on the count (rkd_angle.py)
    try:
        compiled, eager = torch.compile(fn, dynamic=False), grad(fn)
        for _ in range(2):
            torch.testing.assert_close(grad(compiled), eager, rtol=1e-6, atol=1e-12)
    finally:
        torch.set_num_threads(threads)
