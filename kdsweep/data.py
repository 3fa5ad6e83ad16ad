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
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .catalog import DATASET_SUMMARIES
from .errors import UserError

# Batch size used for evaluation passes: large, since no gradients are kept.
EVAL_BATCH = 1024


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
    """Where real datasets are looked for (and downloaded to): $KDSWEEP_DATA or ~/.cache/kdsweep/data."""
    env = os.environ.get("KDSWEEP_DATA")
    return Path(env) if env else Path.home() / ".cache" / "kdsweep" / "data"


def _subset(x: torch.Tensor, y: torch.Tensor, size: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if size is None or size >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:size]
    return x[idx], y[idx]


def _torchvision(cls_name: str, label: str, mean, std, augment: Augment):
    def load(root: Path, size: int | None) -> RawData:
        import torchvision

        cls = getattr(torchvision.datasets, cls_name)
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
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            torch.save(d, tmp)
            os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
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


def get_dataset(name: str) -> DatasetSpec:
    """A built-in dataset, or a spec's recipe (imagefolder:PATH, torchvision:NAME, module:function, a registered
    name; sources.py): cheap, nothing is read; a spec's shape and classes come from dataset_shape()."""
    if name in DATASETS:
        return DATASETS[name]
    from . import sources

    if sources.is_spec(name):
        return sources.recipe(name)
    raise UserError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}, or imagefolder:PATH, torchvision:NAME, "
                    f"package.module:function")


def register(name: str, data) -> None:
    """Name in-memory data (tensors, arrays, or a function returning them) as a dataset of this process: see
    sources.register; the hook the Python API uses to put a notebook's tensors in a StudyConfig."""
    from . import sources

    sources.register(name, data)


def dataset_shape(name: str, data_dir: str | Path | None = None, image_size: int | None = None) -> tuple[tuple[int, ...], int]:
    """(input shape, number of classes): declared for a built-in; read from the data for a spec (once per process)."""
    spec = get_dataset(name)
    if name in DATASETS:
        if image_size is not None:
            raise UserError(f"--image-size resizes imagefolder:, torchvision: and module datasets; {name} is used at "
                            f"its own size {'x'.join(map(str, spec.in_shape[1:]))}")
        return spec.in_shape, spec.num_classes
    from . import sources

    return sources.shape(spec.name, data_dir, image_size)


class DeviceData:
    """The three splits of a dataset, resident on one device, with the seeded batch stream."""

    def __init__(self, raw: RawData, seed: int, val_fraction: float, device: torch.device, stream_seed: int | None = None):
        # `seed` fixes the train/val split; `stream_seed` (default: `seed`) fixes the augmented batch
        # stream, so a confirmation run can draw fresh batches over the very same split.
        if not 0 < val_fraction < 1:
            raise UserError(f"--val-fraction must be in (0, 1), got {val_fraction}")
        n = len(raw.train_y)
        n_val = max(1, int(round(val_fraction * n)))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        self.device, self.seed = device, seed
        self.stream_seed = seed if stream_seed is None else stream_seed
        self.augment, self.num_classes = raw.augment, raw.num_classes
        self.in_shape = tuple(raw.train_x.shape[1:])
        self.provenance = dict(raw.provenance)
        self.tag: str | None = None  # the dataset in file names (teacher cache), set by load_data
        put = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        self.train_x, self.train_y = put(raw.train_x[train_idx]), put(raw.train_y[train_idx])
        self.val_x, self.val_y = put(raw.train_x[val_idx]), put(raw.train_y[val_idx])
        self.test_x, self.test_y = put(raw.test_x), put(raw.test_y)
        # Normalisation folded into one multiply-add: x * scale + shift (uint8 images are in 0..255).
        peak = 255.0 if raw.train_x.dtype == torch.uint8 else 1.0
        mean, std = (raw.mean, raw.std) if raw.mean is not None else channel_stats(self.train_x, peak)
        self.mean, self.std = tuple(mean), tuple(std)
        std = torch.tensor(std)
        per_channel = (1, -1) + (1,) * (raw.train_x.dim() - 2)
        self._scale = put((1.0 / (peak * std)).view(per_channel))
        self._shift = put((-torch.tensor(mean) / std).view(per_channel))

    @property
    def n_train(self) -> int:
        return len(self.train_y)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self._scale + self._shift

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, self.n_train // batch_size)

    def epoch_plan(self, epoch: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (permutation, crop offsets, flips) of one epoch, from the (seed, epoch) stream."""
        g = torch.Generator().manual_seed(self.stream_seed * 1_000_003 + epoch)
        n = self.n_train
        perm = torch.randperm(n, generator=g)
        p = self.augment.pad
        offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=g) if p else torch.zeros(n, 2, dtype=torch.long)
        flips = torch.rand(n, generator=g) < 0.5 if self.augment.flip else torch.zeros(n, dtype=torch.bool)
        return perm, offsets, flips

    def epoch(self, epoch: int, batch_size: int, index: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """Normalised, augmented training batches of one epoch (last partial batch dropped).

        With `index`, each batch is (x, y, ids): ids are the samples' rows in the training split,
        for methods that keep per-sample state (CRD's memory bank).
        """
        batch_size = min(batch_size, self.n_train)
        perm, offsets, flips = (t.to(self.device, non_blocking=True) for t in self.epoch_plan(epoch, batch_size))
        for i in range(self.steps_per_epoch(batch_size)):
            sl = slice(i * batch_size, (i + 1) * batch_size)
            idx = perm[sl]
            x = self._augment(self.train_x[idx], offsets[sl], flips[sl])
            yield (self.normalize(x), self.train_y[idx]) + ((idx,) if index else ())

    def _augment(self, x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        p = self.augment.pad
        if p:
            b, c, h, w = x.shape
            xp = F.pad(x, (p, p, p, p))
            rows = (offsets[:, 0:1] + torch.arange(h, device=x.device)).view(b, 1, h, 1)
            cols = (offsets[:, 1:2] + torch.arange(w, device=x.device)).view(b, 1, 1, w)
            bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
            ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
            x = xp[bi, ci, rows, cols]
        if self.augment.flip:
            x = torch.where(flips.view(-1, 1, 1, 1), x.flip(3), x)
        return x

    def eval_batches(self, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
        for i in range(0, len(y), EVAL_BATCH):
            yield self.normalize(x[i : i + EVAL_BATCH]), y[i : i + EVAL_BATCH]


def channel_stats(x: torch.Tensor, peak: float, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of x / peak (float64 sums over chunks: no float copy of the whole set).

    DeviceData calls it on its training split, after the validation slice left: validation and test
    images never shape the normalisation.
    """
    dims = [0] + list(range(2, x.dim()))
    s = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    s2 = torch.zeros_like(s)
    for i in range(0, len(x), chunk):
        v = x[i:i + chunk].double() / peak
        s += v.sum(dims)
        s2 += (v * v).sum(dims)
    n = x.numel() / x.shape[1]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # a constant channel: centred, not divided by ~0
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


MIN_VAL_PER_CLASS = 10  # below this, validation accuracy moves in steps too coarse to tune on


def check_split(data: DeviceData, batch_size: int, val_fraction: float, say: Callable[[str], None] = print) -> None:
    """Refuse splits a study cannot train or tune on; warn about a validation split too small to mean much.

    Called before any teacher is trained, so a bad split costs seconds, not a teacher.
    """
    n_val, n_train = len(data.val_y), data.n_train
    total = n_val + n_train
    if n_train < batch_size:
        raise UserError(f"the training split holds {n_train} image{'s' * (n_train != 1)} ({total} minus {n_val} held out "
                        f"for validation by --val-fraction {val_fraction:g}): a full batch of {batch_size} is needed; "
                        f"lower --val-fraction or --batch-size, or raise --data-size")
    classes = data.num_classes
    if n_val < classes:
        raise UserError(f"the validation split holds {n_val} image{'s' * (n_val != 1)} (--val-fraction {val_fraction:g} of "
                        f"{total}): at least {classes} (one per class) are needed, {MIN_VAL_PER_CLASS * classes} "
                        f"({MIN_VAL_PER_CLASS} per class) to tune on; raise --val-fraction or --data-size")
    if n_val < MIN_VAL_PER_CLASS * classes:
        say(f"warning: the validation split holds only {n_val} images (--val-fraction {val_fraction:g} of {total}): "
            f"validation accuracy moves in steps of {100 / n_val:.1f}%; {MIN_VAL_PER_CLASS * classes} "
            f"({MIN_VAL_PER_CLASS} per class) or more make a study worth trusting")


def load_data(name: str, data_dir: Path | None, size: int | None, seed: int, val_fraction: float, device: torch.device,
              stream_seed: int | None = None, image_size: int | None = None) -> DeviceData:
    """The dataset's splits for `seed`; `stream_seed` (default: `seed`) seeds the training batch stream only.

    `image_size` resizes a spec's images (sources.py); a built-in refuses it.
    """
    from . import sources

    spec = get_dataset(name)
    if size is not None and size < 10:
        raise UserError(f"--data-size must be at least 10, got {size}")
    if name in DATASETS:
        dataset_shape(name, data_dir, image_size)  # refuses an --image-size
        raw = spec.load(Path(data_dir) if data_dir else default_data_dir(), size)
    else:
        raw = sources.load(spec.name, data_dir, size, image_size)
    device = torch.device(device)
    sources.check_fits(sum(t.nbytes for t in (raw.train_x, raw.train_y, raw.test_x, raw.test_y)), device)
    data = DeviceData(raw, seed, val_fraction, device, stream_seed)
    data.tag = name if name in DATASETS else f"{sources.name_tag(spec.name)}-{sources.train_digest(raw)[:12]}"
    return data
