"""A torchvision that does not load (a wheel built for another torch: "operator torchvision::nms does not
exist", as a new user's CPU-only install got) is one clear line, exit 2, where a dataset or model needs it."""

from __future__ import annotations

import sys

import pytest

from kdsweep.common.errors import UserError
from kdsweep.common.torchvision_import import torchvision


def test_a_working_torchvision_is_returned_with_its_parts():
    tv = torchvision()
    assert hasattr(tv.models, "get_model") and hasattr(tv.datasets, "VisionDataset") and hasattr(tv.transforms, "Compose")


def test_a_torchvision_that_does_not_load_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` now raises ImportError
    with pytest.raises(UserError, match=r"^torchvision does not load with torch \S+ \(.*\): install the two built"):
        torchvision()


def test_a_torchvision_student_then_exits_2_with_that_line(kdsweep, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    rc, out, err = kdsweep("study", "ce", "--dataset", "digits", "--student", "torchvision:resnet18", "--trials", "1",
                           "--epochs", "1")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "torchvision does not load with torch" in lines[0], err
