"""Checkpoints: written atomically, read with `weights_only=True` (no pickled code runs).

A checkpoint holds the student's weights, the method's extra heads beside
them (so the student alone stays loadable for deployment) and enough
metadata to rebuild the model: {"format", "arch", "in_shape", "num_classes",
"student", "heads", "meta"}, and, for teachers, "sha256": the digest of the
network's weights (teacher_cache.model_digest), checked on every load, so a
file damaged after it was written is never used. Files without it (older
kdsweep) still load: there is nothing to check them against.

A teacher may also come as people save them: a plain state_dict, or one under "state_dict" or
"model" (load_model, for the --teacher model named). Whatever the format, a file holding pickled
objects (a whole pickled model) is refused: loading it would run its code.

Files honour the umask (mkstemp alone would make them 0600, and a teacher
shared between users would be unreadable to all but its writer).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from kdsweep.common.atomic import atomic_save
from kdsweep.common.errors import UserError
from kdsweep.models.factory import build_model
from kdsweep.models.zoo import Net

FORMAT = "kdsweep/1"
SHA_KEY = "sha256"


class Damaged(UserError):
    """A checkpoint file that is not a readable kdsweep checkpoint (truncated, overwritten, foreign)."""


class ChecksumMismatch(Damaged):
    """A checkpoint whose weights no longer hash to the digest stored in it."""


def save(path: Path, arch: str, in_shape, num_classes: int, state: dict[str, dict], meta: dict[str, Any],
         sha256: str | None = None) -> Path:
    """Write a checkpoint atomically; `sha256` (the network's model_digest) is stored for load_model to verify."""
    payload = {
        "format": FORMAT,
        "arch": arch,
        "in_shape": list(in_shape),
        "num_classes": int(num_classes),
        "student": {k: v.cpu() for k, v in state["student"].items()},
        "heads": {k: v.cpu() for k, v in state.get("heads", {}).items()},
        "meta": meta,
    }
    if sha256:
        payload[SHA_KEY] = sha256
    return atomic_save(payload, path)


def _read(path: Path) -> Any:
    """The file's contents, read with weights_only=True: tensors and plain containers, never pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        f = open(path, "rb")
    except PermissionError:
        raise UserError(f"checkpoint {path} cannot be read: permission denied (its owner can allow it with "
                        f"`chmod a+r {path}`)") from None
    except OSError as e:
        raise UserError(f"checkpoint {path} cannot be read: {e.strerror or type(e).__name__}") from None
    try:
        with f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        if found:  # a whole pickled model (or any object): loading it would run its code
            raise Damaged(f"checkpoint {path} is unsafe and was not loaded: it holds pickled Python objects ({found[1]}), "
                          f"whose code kdsweep never runs (weights_only=True); save the weights alone: "
                          f"torch.save(model.state_dict(), PATH)") from None
        raise Damaged(f"checkpoint {path} is corrupt or unsafe and was not loaded ({type(e).__name__})") from None


def load(path: Path) -> dict[str, Any]:
    payload = _read(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise Damaged(f"checkpoint {path} is not a kdsweep checkpoint (no format {FORMAT!r})")
    return payload


def plain_state(payload: Any) -> dict[str, torch.Tensor] | None:
    """The state_dict in a checkpoint as people save them: a bare state_dict, or {"state_dict"/"model": state_dict, ...};
    a DataParallel ("module.") or torch.compile ("_orig_mod.") prefix on every key is dropped. None: not one."""
    def is_state(d: Any) -> bool:
        return isinstance(d, dict) and bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())

    state = payload if is_state(payload) else None
    if state is None and isinstance(payload, dict):
        state = next((payload[k] for k in ("state_dict", "model") if is_state(payload.get(k))), None)
    if state is None:
        return None
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def fit(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str, num_classes: int) -> None:
    """Load a plain state_dict into `model`, or one line naming the first missing and unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]  # older files lack the counters
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"first missing key {missing[0]!r}" + (f" ({len(missing)} missing)" if len(missing) > 1 else ""))
        if unexpected:
            parts.append(f"first unexpected key {unexpected[0]!r}" + (f" ({len(unexpected)} unexpected)" if len(unexpected) > 1 else ""))
        if shapes:
            k = shapes[0]
            parts.append(f"{k} has shape {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model built "
                         f"for {num_classes} classes" + (f" ({len(shapes)} shapes differ)" if len(shapes) > 1 else ""))
        raise UserError(f"checkpoint {path} does not fit {arch}: {'; '.join(parts)}")
    model.load_state_dict({**{k: v for k, v in own.items() if k not in state}, **state})


def load_model(path: Path, expect_arch: str | None = None, in_shape=None, num_classes: int | None = None,
               feature: str | None = None, embedding: str | None = None) -> tuple[Net, dict]:
    """Rebuild the network stored in a checkpoint, checking it fits the data it will see.

    A kdsweep checkpoint names its architecture; a plain state_dict (see `plain_state`) is loaded into
    `expect_arch` built for `in_shape` and `num_classes`, and its payload says "plain": True. `feature` and
    `embedding` are the model's tap paths (taps.py); they do not change its weights.
    """
    raw = _read(path)
    if not (isinstance(raw, dict) and raw.get("format") == FORMAT):
        state = plain_state(raw)
        if state is None:
            raise Damaged(f"checkpoint {path} is neither a kdsweep checkpoint nor a state_dict (a dict of tensors, or "
                          f"one under \"state_dict\" or \"model\")")
        if expect_arch is None or in_shape is None or num_classes is None:
            raise UserError(f"checkpoint {path} is a plain state_dict: name its architecture (--teacher)")
        model = build_model(expect_arch, tuple(in_shape), num_classes, feature, embedding)
        fit(model, state, path, expect_arch, num_classes)
        return model, {"arch": expect_arch, "in_shape": list(in_shape), "num_classes": num_classes, "meta": {}, "plain": True}
    p = raw
    if expect_arch and p["arch"] != expect_arch:
        raise UserError(f"checkpoint {path} holds a {p['arch']!r}, not the {expect_arch!r} asked for")
    if in_shape is not None and tuple(p["in_shape"]) != tuple(in_shape):
        raise UserError(f"checkpoint {path} was trained on inputs {tuple(p['in_shape'])}, the data has {tuple(in_shape)}")
    if num_classes is not None and p["num_classes"] != num_classes:
        raise UserError(f"checkpoint {path} has {p['num_classes']} classes, the data has {num_classes}")
    model = build_model(p["arch"], tuple(p["in_shape"]), p["num_classes"], feature, embedding)
    try:
        model.load_state_dict(p["student"])
    except RuntimeError as e:
        raise Damaged(f"checkpoint {path} does not match architecture {p['arch']!r}: {str(e).splitlines()[0]}") from None
    verify(path, model, p)
    return model, p


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (provenance: the checkpoint as the user has it)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, model: Net, payload: dict[str, Any]) -> str:
    """The model's weight digest; raises ChecksumMismatch if the file stored another one."""
    from kdsweep.common.digests import model_digest

    digest = model_digest(model)
    stored = payload.get(SHA_KEY)
    if stored and stored != digest:
        raise ChecksumMismatch(f"checkpoint {path} is damaged: its weights hash to {digest[:12]}, not the "
                               f"{str(stored)[:12]} stored when it was written")
    return digest
