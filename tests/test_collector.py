"""The `kdsweep` command pauses Python's garbage collector over its start-up; training's first step freezes what
start-up made and turns the collector back on (common/collector.py). Timings: benchmarks/collector.py."""

from __future__ import annotations

import gc

import pytest
import torch

from kdsweep import cli
from kdsweep.common import collector
from kdsweep.data.dispatch import load_data
from kdsweep.methods.registry import get_method
from kdsweep.models.factory import build_model
from kdsweep.training.loop import Schedule, train_student


@pytest.fixture
def restored():
    """The collector as this test process had it: on, nothing frozen by the test left frozen."""
    yield
    collector.resume()
    gc.enable()
    gc.unfreeze()


def test_resume_freezes_what_start_up_made_and_collects_again(restored):
    collector.pause()
    assert not gc.isenabled()
    frozen = gc.get_freeze_count()
    made = [[i] for i in range(5000)]  # lists are tracked by the collector: start-up's objects
    collector.resume()
    assert gc.isenabled()
    assert gc.get_freeze_count() >= frozen + len(made)
    again = gc.get_freeze_count()
    collector.resume()  # once only: a second training does not freeze what the first made
    assert gc.get_freeze_count() == again


def test_a_collector_someone_else_turned_off_stays_off(restored):
    gc.disable()
    frozen = gc.get_freeze_count()
    collector.pause()
    collector.resume()
    assert not gc.isenabled()
    assert gc.get_freeze_count() == frozen


def test_the_command_pauses_the_collector_before_it_runs(restored, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "main", lambda: seen.append(gc.isenabled()) or 0)
    monkeypatch.setattr(cli, "release", lambda: None)
    with pytest.raises(SystemExit) as e:
        cli.entry()
    assert e.value.code == 0
    assert seen == [False]


def test_training_resumes_the_collector_at_its_first_step(restored):
    data = load_data("digits", None, 200, 0, 0.2, torch.device("cpu"))
    student = build_model("digitnet_s", data.in_shape, data.num_classes)
    method = get_method("ce")({}, student.shapes(data.in_shape), None, 1)
    collector.pause()
    frozen = gc.get_freeze_count()
    seen = []
    train_student(student, method, None, data, Schedule(1, 32, 0.05), on_epoch=lambda s: seen.append(gc.isenabled()))
    assert seen == [True]
    assert gc.get_freeze_count() > frozen
