"""Progress in logs: long steps say how far they got when their output goes to a file or a pipe.

Seen: `kdsweep teacher --arch torchvision:resnet18` with its output in a file printed nothing for 21 minutes.
tests/test_commands.py runs `kdsweep teacher` into a pipe and reads its epoch line.
"""

from __future__ import annotations

from kdsweep.training.loop import EpochStats
from kdsweep.training.teacher import EpochLines


def test_epoch_lines_come_at_most_every_so_often_and_always_last(monkeypatch):
    clock = iter([0.0, 1.0, 10.0, 31.0, 40.0, 41.0])
    monkeypatch.setattr("kdsweep.training.teacher.time.monotonic", lambda: next(clock))
    said = []
    lines = EpochLines("teacher x", 5, said.append, every=30.0)
    for epoch in range(5):
        lines(EpochStats(epoch, {}, 0.0, 0.5, 0.1, 1.0))
    assert [s.split(",")[0] for s in said] == ["teacher x: epoch 1/5", "teacher x: epoch 3/5", "teacher x: epoch 5/5"]
