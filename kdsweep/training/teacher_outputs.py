"""Teacher outputs computed once per (epoch, step) and shared by every trial that sees that batch.

Every trial of a study sees exactly the same augmented batches (see
:meth:`DeviceData.epoch`), and the teacher is frozen, so the teacher's output
for step `s` of epoch `e` is the same for every trial. The first trial (or
lockstep group) to reach a batch computes it; the others read it back.

A stale entry can never be used: entries are keyed by

  * a SHA-256 of the teacher's weights and buffers (every call, no memo),
  * a SHA-256 of the training split (images, labels, normalisation),
  * the seed, batch size, augmentation and a digest of each epoch's plan
    (permutation, crop offsets, flips),
  * how the teacher is computed (device type, autocast dtype, memory format,
    compiled or not) and its train/eval mode,

and each stored tensor remembers its version counter: a tensor some method
modified in place is treated as a miss and recomputed.

Logits are always kept (45k x 10 x 4 B per CIFAR epoch); feature maps and
embeddings are kept while the store is within its byte budget, else
recomputed for each trial. Budget 0 disables the cache.

Without augmentation (MNIST-1D, MNIST) a step's inputs are rows of the
training split as they are, so the teacher (in eval mode, where a row's
output does not depend on the rest of its batch) runs once over the whole
split, in batches of the training batch size, and each step gathers its rows
from that table: one teacher pass per process serves every epoch, stream seed
and trial, where a sweep's first group otherwise pays one per step. The table
is kept only if all of it fits the budget; otherwise the feed works per step.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from kdsweep.common.digests import data_digest, model_digest, plan_digest
from kdsweep.models.zoo import TAPS, Outputs

# Share of the device's free memory the cache may take when no budget is given.
DEFAULT_SHARE = 0.25
SPLIT = ("split",)  # the slot of a table of outputs for every row of the training split


@dataclass(frozen=True)
class CacheKey:
    teacher: str  # model_digest
    data: str  # data_digest
    batch_size: int
    compute: str  # device type, autocast dtype, memory format, compile, mode


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class TeacherCache:
    """A per-process store of teacher outputs: {key: {(epoch, plan, step): {tap: tensor}}} within a byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget = max(0, int(budget_bytes))
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._store: OrderedDict[CacheKey, dict[tuple, dict[str, tuple[torch.Tensor, int]]]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def clear(self) -> None:
        self._store.clear()
        self.used = 0

    def resize(self, budget_bytes: int) -> None:
        self.budget = max(0, int(budget_bytes))
        if not self.enabled:
            self.clear()
        while self.used > self.budget and len(self._store) > 1:
            self._evict_oldest()

    def _evict_oldest(self, keep: CacheKey | None = None) -> bool:
        for k in self._store:
            if k != keep:
                self.used -= sum(_nbytes(t) for e in self._store[k].values() for t, _ in e.values())
                del self._store[k]
                return True
        return False

    def lookup(self, key: CacheKey, slot: tuple, needs: frozenset[str]) -> Outputs | None:
        if not self.enabled:
            return None
        entry = self._store.get(key, {}).get(slot)
        if entry is None or not needs <= entry.keys() or any(t._version != v for t, v in entry.values()):
            self.misses += 1
            return None
        self._store.move_to_end(key)
        self.hits += 1
        return Outputs(*(entry[k][0] if k in entry else None for k in TAPS))

    def table(self, key: CacheKey, needs: frozenset[str]) -> dict[str, torch.Tensor] | None:
        """The teacher's outputs for every row of the training split, if kept (they are never handed out, only
        gathered from, so no method can edit them in place)."""
        entry = self._store.get(key, {}).get(SPLIT) if self.enabled else None
        if entry is None or not needs <= entry.keys():
            return None
        self._store.move_to_end(key)
        return {tap: t for tap, (t, _) in entry.items()}

    def fits(self, key: CacheKey, nbytes: int) -> bool:
        """Whether `nbytes` more would fit the budget once other keys' entries were evicted."""
        others = sum(_nbytes(t) for k, entries in self._store.items() if k != key
                     for entry in entries.values() for t, _ in entry.values())
        return self.used - others + nbytes <= self.budget

    def keep_table(self, key: CacheKey, table: dict[str, torch.Tensor]) -> None:
        """Keep a whole split's outputs (the caller checked `fits`), evicting other keys' entries first."""
        size = sum(_nbytes(t) for t in table.values())
        while self.used + size > self.budget and self._evict_oldest(keep=key):
            pass
        entries = self._store.setdefault(key, {})
        self._store.move_to_end(key)
        self.used -= sum(_nbytes(t) for t, _ in entries.pop(SPLIT, {}).values())
        entries[SPLIT] = {tap: (t, t._version) for tap, t in table.items()}
        self.used += size

    def store(self, key: CacheKey, slot: tuple, out: Outputs) -> None:
        """Keep the logits always, other taps while within budget (evicting other keys' entries first)."""
        if not self.enabled:
            return
        entries = self._store.setdefault(key, {})
        self._store.move_to_end(key)
        old = entries.pop(slot, {})
        self.used -= sum(_nbytes(t) for t, _ in old.values())
        new = {}
        for tap in TAPS:
            t = getattr(out, tap)
            if t is None:
                continue
            size = _nbytes(t)
            while self.used + size > self.budget and self._evict_oldest(keep=key):
                pass
            if tap == "logits" or self.used + size <= self.budget:
                new[tap] = (t, t._version)
                self.used += size
        entries[slot] = new

    def stats(self) -> dict[str, float]:
        return {"teacher_cache_hits": self.hits, "teacher_cache_misses": self.misses,
                "teacher_cache_tables": sum(SPLIT in entries for entries in self._store.values()),
                "teacher_cache_mb": self.used / 2**20, "teacher_cache_budget_mb": self.budget / 2**20}


def default_budget_bytes(device: torch.device) -> int:
    """A quarter of the device's free memory (GPU: free device memory; CPU: available RAM)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(DEFAULT_SHARE * free)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 4 * 2**30
    return int(DEFAULT_SHARE * avail)


_SHARED: TeacherCache | None = None


def shared(budget_mb: float | None, device: torch.device) -> TeacherCache:
    """The process-wide cache, (re)sized to `budget_mb` (None: sized to the device; 0: disabled)."""
    global _SHARED
    budget = default_budget_bytes(device) if budget_mb is None else int(budget_mb * 2**20)
    if _SHARED is None:
        _SHARED = TeacherCache(budget)
    else:
        _SHARED.resize(budget)
    return _SHARED


class TeacherFeed:
    """The trainer's view of the teacher: outputs for (epoch, step), from the cache or computed (and stored).

    `compute(x)` runs the teacher's taps for a batch; the feed never names a
    method, it only knows which taps were asked for.
    """

    def __init__(self, cache: TeacherCache | None, teacher: torch.nn.Module, data, batch_size: int,
                 needs: frozenset[str], compute: Callable[[torch.Tensor], Outputs], compute_tag: str):
        self.cache = cache if cache is not None and cache.enabled else None
        self.data, self.batch_size, self.compute = data, batch_size, compute
        self.needs = frozenset(needs) | {"logits"}
        self.key = None
        if self.cache is not None:
            mode = "train" if teacher.training else "eval"
            taps = "|".join(str(getattr(teacher, a, "")) for a in ("feature_path", "embedding_path"))  # hooked: its layers
            self.key = CacheKey(model_digest(teacher), data_digest(data), batch_size, f"{compute_tag}|{mode}|{taps}")
        # One pass over the split serves every step (module docstring) when a step's inputs are plain rows and no
        # row's output depends on its batch (batch norm in train mode would).
        self.whole = self.cache is not None and not teacher.training and not (data.augment.pad or data.augment.flip)
        self._epoch: tuple = ()

    def begin_epoch(self, epoch: int) -> None:
        if self.cache is not None:
            self._epoch = (epoch, plan_digest(self.data.epoch_plan(epoch, self.batch_size)))

    def __call__(self, step: int, x: torch.Tensor, rows: torch.Tensor) -> Outputs:
        """The outputs for step `step`, whose inputs `x` are the training split's rows `rows`."""
        if self.cache is None:
            return self.compute(x)
        if self.whole:
            table = self._table()
            if table is not None:
                self.cache.hits += 1
                return Outputs(*(table[tap].index_select(0, rows) if tap in table else None for tap in TAPS))
        slot = (*self._epoch, step)
        out = self.cache.lookup(self.key, slot, self.needs)
        if out is None:
            out = self.compute(x)
            self.cache.store(self.key, slot, out)
        return out

    def _table(self) -> dict[str, torch.Tensor] | None:
        """The whole split's outputs: kept, or computed now (one miss) if they fit the budget, judged from the
        first batch's; else None, and the feed works per step from then on."""
        table = self.cache.table(self.key, self.needs)
        if table is not None:
            return table
        data, n, b = self.data, self.data.n_train, self.batch_size
        chunk = lambda i: self.compute(data.normalize(data.train_x[i : i + b]))  # noqa: E731 - rows i to i + b
        first = chunk(0)
        row_bytes = sum(_nbytes(t) for t in first if t is not None) / min(b, n)
        if not self.cache.fits(self.key, math.ceil(row_bytes * n)):
            self.whole = False
            return None
        self.cache.misses += 1
        parts = [first, *(chunk(i) for i in range(b, n, b))]
        table = {tap: torch.cat([getattr(p, tap) for p in parts]) for tap in TAPS if getattr(first, tap) is not None}
        self.cache.keep_table(self.key, table)
        return table
