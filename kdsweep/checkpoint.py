"""Checkpoints: written atomically, read with `weights_only=True` (no pickled code runs).

A checkpoint holds the student's weights, the method's extra heads beside
them (so the student alone stays loadable for deployment) and enough
metadata to rebuild the model: {"format", "arch", "in_shape", "num_classes",
"student", "heads", "meta"}, and, for teachers, "sha256": the digest of the
network's weights (teacher_cache.model_digest), checked on every load, so a
file damaged after it was written is never used. Files without it (older
kdsweep) still load: there is nothing to check them against.

Files honour the umask (mkstemp alone would make them 0600, and a teacher
shared between users would be unreadable to all but its writer).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .models import Net, build_model

FORMAT = "kdsweep/1"
SHA_KEY = "sha256"


class Damaged(UserError):
    """A checkpoint file that is not a readable kdsweep checkpoint (truncated, overwritten, foreign)."""


class ChecksumMismatch(Damaged):
    """A checkpoint whose weights no longer hash to the digest stored in it."""


def _umask() -> int:
    # /proc/self/status tells without changing it; os.umask() can only be read by setting it (racy with threads).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode an ordinary new file gets under the current umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def save(path: Path, arch: str, in_shape, num_classes: int, state: dict[str, dict], meta: dict[str, Any],
         sha256: str | None = None) -> Path:
    """Write a checkpoint atomically; `sha256` (the network's model_digest) is stored for load_model to verify."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    # temp file in the same directory + rename: a kill never leaves half a checkpoint.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: Path) -> dict[str, Any]:
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
            payload = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise Damaged(f"checkpoint {path} is corrupt or unsafe and was not loaded ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise Damaged(f"checkpoint {path} is not a kdsweep checkpoint (no format {FORMAT!r})")
    return payload


def load_model(path: Path, expect_arch: str | None = None, in_shape=None, num_classes: int | None = None) -> tuple[Net, dict]:
    """Rebuild the network stored in a checkpoint, checking it fits the data it will see."""
    p = load(path)
    if expect_arch and p["arch"] != expect_arch:
        raise UserError(f"checkpoint {path} holds a {p['arch']!r}, not the {expect_arch!r} asked for")
    if in_shape is not None and tuple(p["in_shape"]) != tuple(in_shape):
        raise UserError(f"checkpoint {path} was trained on inputs {tuple(p['in_shape'])}, the data has {tuple(in_shape)}")
    if num_classes is not None and p["num_classes"] != num_classes:
        raise UserError(f"checkpoint {path} has {p['num_classes']} classes, the data has {num_classes}")
    model = build_model(p["arch"], tuple(p["in_shape"]), p["num_classes"])
    try:
        model.load_state_dict(p["student"])
    except RuntimeError as e:
        raise Damaged(f"checkpoint {path} does not match architecture {p['arch']!r}: {str(e).splitlines()[0]}") from None
    verify(path, model, p)
    return model, p


def verify(path: Path, model: Net, payload: dict[str, Any]) -> str:
    """The model's weight digest; raises ChecksumMismatch if the file stored another one."""
    from .teacher_cache import model_digest

    digest = model_digest(model)
    stored = payload.get(SHA_KEY)
    if stored and stored != digest:
        raise ChecksumMismatch(f"checkpoint {path} is damaged: its weights hash to {digest[:12]}, not the "
                               f"{str(stored)[:12]} stored when it was written")
    return digest
