"""Every registered method against tests/fixtures/method_losses.json: loss values computed once by
float64 NumPy implementations of the papers' (and seed 003's) formulas (tests/make_method_fixture.py).

A change to any formula fails here until the fixture is deliberately regenerated; a new method
fails until it has a fixture entry."""

from __future__ import annotations

import json

import make_method_fixture as fx
import pytest
import torch

from kdsweep.methods.base import SampleIndex
from kdsweep.methods.registry import METHODS
from kdsweep.models.zoo import Outputs, Shapes

CASES = json.loads(fx.FIXTURE.read_text())


def test_every_registered_method_has_a_fixture_entry():
    assert set(METHODS) <= {c["method"] for c in CASES}, sorted(set(METHODS) - {c["method"] for c in CASES})
    assert {c["method"] for c in CASES} <= set(METHODS), "fixture entries for methods that no longer exist"


def test_fixture_is_what_the_script_generates():
    # The stored cases and values are the script's: a hand edit of either shows up here.
    assert [{k: v for k, v in c.items() if k not in ("checksum", "expected")} for c in CASES] == fx.cases()
    for c in CASES:
        assert fx.checksum(fx.case_inputs(c)) == pytest.approx(c["checksum"], rel=1e-12), (c["method"], c["case"])
        got = fx.expected(c)
        # Step by step, term by term: pytest.approx compares flat collections only (pytest 9 refuses nesting).
        assert [sorted(step) for step in got] == [sorted(step) for step in c["expected"]], (c["method"], c["case"])
        for step, want in zip(got, c["expected"]):
            for term, value in want.items():
                assert step[term] == pytest.approx(value, rel=1e-9), (c["method"], c["case"], term)


def _t(a, dtype=torch.float32):
    return torch.as_tensor(a).to(dtype)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: exact sums, and quicker on a shared machine


@pytest.mark.parametrize("case", CASES, ids=[f"{c['method']}-{c['case']}" for c in CASES])
def test_method_matches_fixture(case):
    cls = METHODS[case["method"]]
    shapes = {side: Shapes(tuple(case[f"{side}_feature"]), tuple(case[f"{side}_embedding"]), (fx.CLASSES,)) for side in "st"}
    assert set(case["hp"]) == set(cls.space), "the fixture's hyperparameters are not the method's"
    m = cls(case["hp"], shapes["s"], shapes["t"], case["epochs"]).train()
    steps = fx.case_inputs(case)
    params = {k: _t(v) for k, v in steps[0]["params"].items()}
    assert {k: tuple(v.shape) for k, v in m.named_parameters()} == {k: tuple(v.shape) for k, v in params.items()}, \
        "the method's heads differ from the fixture's"
    m.load_state_dict(params, strict=False)
    if cls.needs_index:  # crd: the fixture's banks and columns in place of the method's own draws
        m.memory_s, m.memory_t = _t(steps[0]["memory_s"]), _t(steps[0]["memory_t"])
        cols = iter(_t(d["cols"], torch.long) for d in steps)
        m.draw = lambda index, counts_only=False: (next(cols)[:, 1:], None)  # column 0 holds the batch's ids
    for d, want in zip(steps, case["expected"]):
        s = Outputs(*(_t(d[f"s_{k}"]) for k in ("logits", "feature", "embedding")))
        t = Outputs(*(_t(d[f"t_{k}"]) for k in ("logits", "feature", "embedding")))
        extra = {"index": SampleIndex(_t(d["ids"], torch.long), fx.CRD_N)} if cls.needs_index else {}
        got = m(s, t, _t(d["y"], torch.long), case["epoch"], **extra)
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key].dtype == torch.float32 and got[key].dim() == 0
            assert got[key].item() == pytest.approx(value, rel=2e-5, abs=1e-6), key
