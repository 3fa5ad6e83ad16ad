"""Search-space advice: a best value at the end of its range is told as something the user can act on."""

from __future__ import annotations

from kdsweep.common.space import Float, edge_warnings
from kdsweep.methods.registry import get_method


def test_a_weight_at_the_end_of_its_possible_values_is_not_told_to_widen():
    """Seen: 'alpha=0.02593 is at the bottom of [0, 1]: widen the range', for a weight that cannot leave [0, 1]."""
    space = get_method("vanilla_kd").space
    (line,) = edge_warnings({"alpha": 0.02593, "temperature": 4.0}, space)
    assert line == ("alpha=0.02593 is at the bottom of [0, 1], where alpha ends (0): the tuned method wants as little "
                    "of it as it can have")
    assert "as much of it" in edge_warnings({"alpha": 0.99, "temperature": 4.0}, space)[0]


def test_a_range_that_can_grow_is_told_to_widen():
    space = {"weight": Float(0.1, 10.0, 1.0, log=True), "alpha": Float(0.2, 1.0, 0.7, floor=0.0, ceiling=1.0)}
    lines = edge_warnings({"weight": 9.9, "alpha": 0.2}, space)
    assert lines == ["weight=9.9 is at the top of [0.1, 10] log: widen the range",
                     "alpha=0.2 is at the bottom of [0.2, 1]: widen the range"]  # a narrowed range can widen to 0
    assert edge_warnings({"weight": 1.0, "alpha": 0.5}, space) == []


def test_floor_and_ceiling_are_not_study_settings():
    """A study's settings (its resume fingerprint) hold what was searched, so declaring a floor keeps old studies."""
    assert Float(0.0, 1.0, 0.7, floor=0.0, ceiling=1.0).settings() == Float(0.0, 1.0, 0.7).settings()
