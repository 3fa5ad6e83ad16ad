"""Datasets as device-resident tensors (uint8 images, float signals), split once, augmented on the device.

Every dataset yields the same three splits for a given seed:
  * train - what students and teachers learn from;
  * val   - a seeded slice held out of the training set (default 10%);
            Optuna tunes on it;
  * test  - the dataset's official test set (or a fixed held-out slice for
            datasets without one); Optuna never sees it.

Training batches come from :meth:`DeviceData.epoch`, a stream seeded by
(stream seed, epoch) - the stream seed is the split seed unless a
confirmation run asks for another one: the permutation, crop offsets and flips are drawn on the CPU
from that seed (cheap, identical on every device) and applied to the whole
batch on the device. Every trial of every method therefore sees exactly the
same augmented batches, and no per-sample Python transform runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from kdsweep.common.atomic import atomic_save
from kdsweep.common.cache import cache_dir
from kdsweep.common.errors import UserError
from kdsweep.common.torchvision_import import torchvision
from kdsweep.data.catalog import DATASET_SUMMARIES


@dataclass(frozen=True)
class Augment:
    pad: int = 0  # random crop of the original size from a zero-padded image
    flip: bool = False  # random horizontal flip

    def describe(self) -> str:
        parts = ([f"crop(pad={self.pad})"] if self.pad else []) + (["hflip"] if self.flip else [])
        return "+".join(parts) or "none"


@dataclass
class RawData:
    """A dataset as loaded: uint8 images (N, C, H, W) or float32 signals (N, C, L), and int64 labels.

    uint8 inputs are scaled by 1/255 before (x - mean) / std; float inputs are taken as they are.
    mean/std None: computed by DeviceData from the training split (user data, sources.py).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    num_classes: int
    augment: Augment
    provenance: dict = field(default_factory=dict)  # where user data came from: parent-run params (sources.py)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    load: Callable[[Path, int | None], RawData]
    teacher: str  # default pair
    student: str
    teacher_epochs: int
    epochs: int  # default student epochs per trial
    batch_size: int
    in_shape: tuple[int, ...] = (3, 32, 32)
    num_classes: int = 10
    # The training recipe every method of a sweep shares (and teachers use): see train.OPTIMIZERS.
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    teacher_lr: float = 0.05
    # CPU intra-op threads when $OMP_NUM_THREADS is unset (None: every core). Models of a few thousand
    # parameters run ops too small to share: on a busy machine extra threads mostly wait for each other.
    cpu_threads: int | None = None

    @property
    def summary(self) -> str:
        """Declared once, in the torch-free catalog the command line reads (a spec is its own summary)."""
        return DATASET_SUMMARIES.get(self.name, self.name)


def default_data_dir() -> Path:
    """Where real datasets are looked for (and downloaded to): $KDSWEEP_DATA, else data/ in the cache folder
    (~/.cache/kdsweep/data, moved with $KDSWEEP_CACHE as everything else kdsweep caches)."""
    env = os.environ.get("KDSWEEP_DATA")
    return Path(env) if env else cache_dir() / "data"


def _subset(x: torch.Tensor, y: torch.Tensor, size: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if size is None or size >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:size]
    return x[idx], y[idx]


def _torchvision(cls_name: str, label: str, mean, std, augment: Augment):
    def load(root: Path, size: int | None) -> RawData:
        cls = getattr(torchvision().datasets, cls_name)
        splits = {}
        for train in (True, False):
            try:
                try:
                    ds = cls(str(root), train=train, download=False)
                except RuntimeError:  # not there yet: try the network once
                    ds = cls(str(root), train=train, download=True)
            except Exception as e:
                raise UserError(
                    f"{label} not found in {root} and could not be downloaded ({type(e).__name__}); "
                    f"put the torchvision copy there, or pass --data-dir DIR, or use --dataset digits/synthetic offline"
                ) from None
            x = torch.as_tensor(ds.data)
            x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
            splits[train] = (x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long))
        (trx, try_), (tex, tey) = splits[True], splits[False]
        trx, try_ = _subset(trx, try_, size, 0)
        return RawData(trx, try_, tex, tey, mean, std, int(tey.max()) + 1, augment)

    return load


def _digits(root: Path, size: int | None) -> RawData:
    """scikit-learn's bundled 8x8 digits (1797 images, offline); 20% fixed test slice."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)
    y = torch.as_tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # fixed: test never moves
    n_test = len(y) // 5
    te, tr = perm[:n_test], perm[n_test:]
    trx, try_ = _subset(x[tr], y[tr], size, 0)
    return RawData(trx, try_, x[te], y[te], (0.3,), (0.37,), 10, Augment(pad=1))


def make_synthetic(n: int, seed: int = 0, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-shaped (3x32x32 uint8) images with learnable class structure.

    Each class has a smooth random colour pattern; a sample is its class
    pattern at a random contrast and shift, plus a smooth distractor and pixel
    noise, so a conv net learns it well but not instantly.
    """
    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.randn(num_classes, 3, 4, 4, generator=g), size=32, mode="bicubic", align_corners=False)
    y = torch.randint(num_classes, (n,), generator=g)
    out = torch.empty(n, 3, 32, 32, dtype=torch.uint8)
    for i in range(0, n, 4096):  # chunked: bounded memory for large n
        yy = y[i : i + 4096]
        b = len(yy)
        img = protos[yy] * (0.6 + 0.8 * torch.rand(b, 1, 1, 1, generator=g))
        shift = torch.randint(-3, 4, (2,), generator=g).tolist()
        img = torch.roll(img, shifts=shift, dims=(2, 3))
        img = img + 0.8 * F.interpolate(torch.randn(b, 3, 2, 2, generator=g), size=32, mode="bilinear", align_corners=False)
        img = img + 0.5 * torch.randn(b, 3, 32, 32, generator=g)
        out[i : i + b] = (img * 40 + 128).clamp(0, 255).to(torch.uint8)
    return out, y


def _synthetic(root: Path, size: int | None) -> RawData:
    n = size or 5000
    x, y = make_synthetic(n + max(500, n // 5), seed=0)
    return RawData(x[:n], y[:n], x[n:], y[n:], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 10, Augment(pad=4, flip=True))


def _mnist1d(root: Path, size: int | None) -> RawData:
    """MNIST-1D (Greydanus & Kobak 2024), generated offline by the `mnist1d` package with its default
    arguments (the published dataset: 4000 train / 1000 test signals of length 40, 10 classes). Real
    data, held out as for the others: the package's test split is the test split.

    Signals are float, already centred and scaled to unit std by the generator, so they are kept as
    float32 (N, 1, 40) with an identity normalisation: (N, C, L) is what Conv1d reads and what an
    MLP flattens; a fake height of 1 would only invite 2D image code (crops, flips) that has no
    meaning for a signal. No augmentation, as in the paper. Generating takes ~2 s, so the arrays are
    cached under the data dir, keyed by the package's version (its default arguments, seed included,
    are the version's). Generation is deterministic: the package seeds numpy's and Python's global
    RNGs with its seed 42 (restored afterwards, so no caller's random stream moves).
    """
    x, y, tx, ty = _mnist1d_arrays(root)
    trx, try_ = _subset(x, y, size, 0)
    return RawData(trx, try_, tx, ty, (0.0,), (1.0,), 10, Augment())


def mnist1d_generate() -> dict[str, torch.Tensor]:
    """The published MNIST-1D, generated now (never downloaded): x (N, 1, 40) float32, y int64, for train and test."""
    import random

    import numpy as np
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(get_dataset_args())
    finally:  # make_dataset reseeds the global RNGs: leave them as they were
        np.random.set_state(np_state)
        random.setstate(py_state)
    sig = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32)).unsqueeze(1).contiguous()  # noqa: E731
    lab = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
    return {"x": sig(d["x"]), "y": lab(d["y"]), "x_test": sig(d["x_test"]), "y_test": lab(d["y_test"])}


MNIST1D_LENGTH = 40


def _mnist1d_arrays(root: Path) -> tuple[torch.Tensor, ...]:
    from importlib import metadata

    try:  # the version, not an import: importing the generator (scipy) costs a second a run
        version = metadata.version("mnist1d")
    except metadata.PackageNotFoundError:
        raise UserError("dataset mnist1d needs the `mnist1d` package: pip install mnist1d") from None
    path = root / "mnist1d" / f"mnist1d-{version}.pt"
    d = None
    if path.is_file():
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            if d["x"].shape[1:] != (1, MNIST1D_LENGTH) or len(d["x"]) != len(d["y"]):
                d = None
        except Exception:  # damaged or foreign file: generate again (and replace it below)
            d = None
    if d is None:
        d = mnist1d_generate()
        try:  # a cache only: a read-only data dir just means generating every time
            atomic_save(d, path)  # a concurrent reader sees the old file or the whole new one
        except OSError:
            pass
    return d["x"], d["y"], d["x_test"], d["y_test"]


_CIFAR_AUG = Augment(pad=4, flip=True)
DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in [
        DatasetSpec("cifar10", _torchvision("CIFAR10", "CIFAR-10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), _CIFAR_AUG),
                    "resnet18", "smallnet", 30, 10, 128),
        DatasetSpec("cifar100", _torchvision("CIFAR100", "CIFAR-100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), _CIFAR_AUG),
                    "resnet18", "smallnet", 30, 10, 128, num_classes=100),
        DatasetSpec("mnist", _torchvision("MNIST", "MNIST", (0.1307,), (0.3081,), Augment()),
                    "mlp1200", "mlp800", 10, 10, 128, in_shape=(1, 28, 28)),
        DatasetSpec("digits", _digits, "digitnet_l", "digitnet_s", 30, 10, 32, in_shape=(1, 8, 8)),
        # The paper's recipe (Adam, batch 100, no weight decay) in epochs of 36 steps; measured on CPU:
        # the CNN teacher reaches ~93% test in 100 epochs (its cosine lr from 2e-2 averages the paper's constant
        # 1e-2; 1e-2 peaks at ~91%), the MLP ~64% in 30 (~2 s; longer training only overfits: 100% train acc).
        # One CPU thread: measured on a loaded 2-core machine, 2 threads made a ce trial 17x slower.
        DatasetSpec("mnist1d", _mnist1d, "cnn1d", "mlp100", 100, 30, 100,
                    in_shape=(1, 40), optimizer="adam", weight_decay=0.0, teacher_lr=2e-2, cpu_threads=1),
        DatasetSpec("synthetic", _synthetic, "resnet18", "smallnet", 5, 5, 128),
    ]
}


