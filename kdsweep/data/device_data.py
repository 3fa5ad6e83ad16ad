"""The three splits of a dataset resident on one device, with the seeded augmented batch stream every
trial of every method sees, and the checks on a split's size.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from kdsweep.common.errors import UserError
from kdsweep.data import inputs
from kdsweep.data.builtin import RawData

# Batch size used for evaluation passes: large, since no gradients are kept.
EVAL_BATCH = 1024


class DeviceData:
    """The three splits of a dataset, resident on one device, with the seeded batch stream."""

    def __init__(self, raw: RawData, seed: int, val_fraction: float, device: torch.device, stream_seed: int | None = None,
                 preprocess: str | None = None):
        # `seed` fixes the train/val split; `stream_seed` (default: `seed`) fixes the augmented batch
        # stream, so a confirmation run can draw fresh batches over the very same split. `preprocess`: inputs.py.
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
        self._declared = (raw.mean, raw.std)  # a built-in's statistics (None: the training split's)
        self._see_through(preprocess)

    def _see_through(self, preprocess: str | None) -> None:
        """Normalisation folded into one multiply-add: x * scale + shift (uint8 images are in 0..255)."""
        peak = 255.0 if self.train_x.dtype == torch.uint8 else 1.0
        mean, std, self.preprocess = input_statistics(self._declared, self.train_x, peak, preprocess)
        self.mean, self.std = tuple(mean), tuple(std)
        std = torch.tensor(std)
        per_channel = (1, -1) + (1,) * (self.train_x.dim() - 2)
        self._scale = (1.0 / (peak * std)).view(per_channel).to(self.device)
        self._shift = (-torch.tensor(mean) / std).view(per_channel).to(self.device)

    def seen_through(self, preprocess: str | None) -> "DeviceData":
        """The same splits through another preprocessing (a shallow copy sharing the tensors): for checking a teacher."""
        other = copy.copy(self)
        other._see_through(preprocess)
        return other

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


def input_statistics(declared: tuple, train_x: torch.Tensor, peak: float, preprocess: str | None
                     ) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, the preprocessing in words) that every model of the study sees its inputs through (inputs.py);
    declared: a built-in dataset's (mean, std), or (None, None)."""
    how, channels = inputs.parse(preprocess), train_x.shape[1]
    if how.kind == inputs.NONE:
        return (0.0,) * channels, (1.0,) * channels, "none (images scaled to [0, 1], floats as given)"
    if how.kind == inputs.STANDARDIZE and declared[0] is not None:
        mean, std = tuple(declared[0]), tuple(declared[1])
        whose = "the dataset's declared statistics"
    elif how.kind == inputs.STANDARDIZE:
        mean, std = channel_stats(train_x, peak)
        whose = "the training split's statistics"
    else:
        mean, std = how.per_channel(channels)
        whose = "your statistics"
    numbers = f"mean {','.join(f'{v:.4g}' for v in mean)}, std {','.join(f'{v:.4g}' for v in std)}"
    return mean, std, f"{how.text} with {whose} ({numbers})"


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
