"""DeviceData's optional stream seed: fresh batches over the same split, default unchanged."""

import torch

from kdsweep.data.builtin import Augment, RawData, make_synthetic
from kdsweep.data.device_data import DeviceData


def _raw():
    x, y = make_synthetic(120, seed=0)
    return RawData(x[:100], y[:100], x[100:], y[100:], (0.5,) * 3, (0.25,) * 3, 10, Augment(pad=4, flip=True))


def test_stream_seed_changes_batches_not_split():
    raw, cpu = _raw(), torch.device("cpu")
    base = DeviceData(raw, 3, 0.2, cpu)
    same = DeviceData(raw, 3, 0.2, cpu, stream_seed=3)
    fresh = DeviceData(raw, 3, 0.2, cpu, stream_seed=4)
    for d in (same, fresh):  # the split follows `seed` only
        assert torch.equal(d.val_x, base.val_x) and torch.equal(d.train_y, base.train_y)
    for a, b in zip(base.epoch_plan(1, 16), same.epoch_plan(1, 16)):  # default stream = the split seed
        assert torch.equal(a, b)
    assert not torch.equal(base.epoch_plan(1, 16)[0], fresh.epoch_plan(1, 16)[0])
