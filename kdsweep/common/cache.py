"""kdsweep's per-user cache folder: cached teachers, shared objects, and what was measured about this machine."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$KDSWEEP_CACHE, else ~/.cache/kdsweep."""
    env = os.environ.get("KDSWEEP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kdsweep"
