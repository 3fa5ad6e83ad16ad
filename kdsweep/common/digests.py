"""SHA-256 digests of tensors, models and data streams, memoised per live tensor: the identities
that teachers, splits and the teacher-output cache are keyed by.
"""

from __future__ import annotations

import hashlib
import itertools
import weakref
from typing import Iterable

import torch


def _update(h, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    # Logical (not memory) order, so channels_last and contiguous copies of equal weights hash alike.
    h.update(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's class, parameters and buffers.

    Each tensor's digest is memoised (tensor_digest): the teacher is hashed once per
    process, not at every trial start, and an in-place edit (its version counter) or a
    replaced tensor is hashed anew, so an edited teacher can still never hit. The live
    parameter objects are walked, not state_dict(), whose detached copies are new
    objects at every call and would never hit the memo.
    """
    model = getattr(model, "inner", model) if hasattr(model, "feature_path") else model  # a taps.Tapped: its weights,
    # not the wrapper around them (a built-in teacher read with other taps is the same teacher)
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        h.update(name.encode())
        h.update(tensor_digest(t).encode())
    return h.hexdigest()


# id(tensor) -> (weakref to it, its version, digest). The weakref pins identity (a
# freed tensor's address cannot alias a new one) and the version catches in-place edits.
_MEMO: dict[int, tuple[weakref.ref, int, str]] = {}


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor, memoised while the same tensor object is alive and unmodified."""
    hit = _MEMO.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    h = hashlib.sha256()
    _update(h, t)
    digest = h.hexdigest()
    _MEMO[id(t)] = (weakref.ref(t, lambda _r, k=id(t): _MEMO.pop(k, None)), t._version, digest)
    return digest


def data_digest(data) -> str:
    """Identity of a DeviceData's training stream, short of the per-epoch plan."""
    h = hashlib.sha256()
    for t in (data.train_x, data.train_y, data._scale, data._shift):
        h.update(tensor_digest(t).encode())
    h.update(f"|seed={data.seed}|aug={data.augment!r}|n={data.n_train}".encode())
    return h.hexdigest()


def plan_digest(plan: Iterable[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in plan:
        _update(h, t)
    return h.hexdigest()
