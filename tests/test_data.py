import pickle

import numpy as np
import pytest
import torch

from kdsweep.common.errors import UserError
from kdsweep.data.builtin import Augment, RawData, make_synthetic
from kdsweep.data.device_data import DeviceData
from kdsweep.data.dispatch import load_data

CPU = torch.device("cpu")


def test_digits_splits_are_disjoint_and_seeded():
    a = load_data("digits", None, None, seed=0, val_fraction=0.1, device=CPU)
    b = load_data("digits", None, None, seed=0, val_fraction=0.1, device=CPU)
    c = load_data("digits", None, None, seed=1, val_fraction=0.1, device=CPU)
    assert a.in_shape == (1, 8, 8) and a.num_classes == 10
    n = a.n_train + len(a.val_y)
    assert len(a.val_y) == round(0.1 * n)
    # Same seed: the same split. Other seed: another val slice, the same fixed test set.
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.val_x, c.val_x)
    assert torch.equal(a.test_x, c.test_x)
    # No image of val or test is in train (digits has a few exact duplicates, so compare index sets instead).
    flat = lambda t: {bytes(r) for r in t.flatten(1).numpy()}  # noqa: E731
    assert len(flat(a.val_x) & flat(a.train_x)) <= 5
    assert len(flat(a.test_x) & flat(a.train_x)) <= 10


def test_synthetic_is_deterministic_and_learnable_shape():
    x1, y1 = make_synthetic(300, seed=0)
    x2, y2 = make_synthetic(300, seed=0)
    assert x1.shape == (300, 3, 32, 32) and x1.dtype == torch.uint8
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert set(y1.tolist()) == set(range(10))
    # Class structure: class means differ far more than the noise of a mean.
    means = torch.stack([x1[y1 == k].float().mean(0) for k in range(10)])
    assert (means[0] - means[1]).abs().mean() > 5


def _raw(n=64, aug=Augment(pad=4, flip=True)):
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (n,))
    return RawData(x, y, x[:8], y[:8], (0.5,) * 3, (0.25,) * 3, 10, aug)


def test_augmentation_stream_same_seed_same_batches():
    raw = _raw()
    d1, d2, d3 = (DeviceData(raw, s, 0.25, CPU) for s in (7, 7, 8))
    e0 = list(d1.epoch(0, 16))
    assert len(e0) == d1.n_train // 16
    for (xa, ya), (xb, yb) in zip(e0, d2.epoch(0, 16)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Another epoch, or another seed, is another stream.
    assert not torch.equal(e0[0][0], next(iter(d1.epoch(1, 16)))[0])
    assert not torch.equal(next(iter(d3.epoch(0, 16)))[0], next(iter(DeviceData(raw, 9, 0.25, CPU).epoch(0, 16)))[0])


def test_crop_and_flip_are_windows_of_the_padded_image():
    raw = _raw(n=40)
    d = DeviceData(raw, 0, 0.1, CPU)
    perm, offsets, flips = d.epoch_plan(0, 8)
    x, _ = next(iter(d.epoch(0, 8)))
    for i in range(8):
        src = torch.nn.functional.pad(d.train_x[perm[i]], (4, 4, 4, 4)).float()
        dy, dx = offsets[i].tolist()
        want = src[:, dy:dy + 32, dx:dx + 32]
        if flips[i]:
            want = want.flip(2)
        assert torch.allclose(x[i], d.normalize(want.unsqueeze(0))[0])
    assert flips[:8].any() and (~flips[:8]).any()


def test_cifar10_real_loader_reads_the_torchvision_format(tmp_path, monkeypatch):
    """The real torchvision CIFAR-10 loader on files in its own format (integrity check skipped: our bytes differ)."""
    import torchvision

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        with open(base / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, 20))}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    d = load_data("cifar10", tmp_path, None, seed=0, val_fraction=0.1, device=CPU)
    assert d.in_shape == (3, 32, 32)
    assert d.n_train + len(d.val_y) == 100 and len(d.test_y) == 20
    assert d.augment == Augment(pad=4, flip=True)


def test_missing_dataset_offline_is_one_clear_line(tmp_path, monkeypatch):
    import torchvision

    def no_network(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    with pytest.raises(UserError) as e:
        load_data("cifar10", tmp_path / "none", None, 0, 0.1, CPU)
    msg = str(e.value)
    assert "CIFAR-10 not found in" in msg and str(tmp_path / "none") in msg and "\n" not in msg
