"""Checkpoints: written atomically, read with `weights_only=True` (no pickled code runs).

A checkpoint holds the student's weights, the method's extra heads beside
them (so the student alone stays loadable for deployment) and enough
metadata to rebuild the model: {"format", "arch", "in_shape", "num_classes",
"student", "heads", "meta"}.
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


def save(path: Path, arch: str, in_shape, num_classes: int, state: dict[str, dict], meta: dict[str, Any]) -> Path:
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
    # temp file in the same directory + rename: a kill never leaves half a checkpoint.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
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
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt or unsafe and was not loaded ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} is not a kdsweep checkpoint (no format {FORMAT!r})")
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
        raise UserError(f"checkpoint {path} does not match architecture {p['arch']!r}: {str(e).splitlines()[0]}") from None
    return model, p
