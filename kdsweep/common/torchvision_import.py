"""torchvision, imported where a dataset, a model or the bench needs it, or one clear line saying why it cannot be.

A torchvision wheel built for another torch (a CPU-only torch from one index, torchvision from another) fails
on import with "operator torchvision::nms does not exist", a traceback that does not name the cause. kdsweep
needs torchvision only for its datasets, models and the bench's reference, so nothing else waits on it.
"""

from __future__ import annotations

from types import ModuleType

from kdsweep.common.errors import UserError


def torchvision() -> ModuleType:
    """The torchvision module (with `datasets`, `models` and `transforms` loaded)."""
    try:
        import torchvision as tv
        import torchvision.datasets  # noqa: F401
        import torchvision.models  # noqa: F401
        import torchvision.transforms  # noqa: F401
    except (RuntimeError, ImportError, OSError) as e:
        import torch

        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"torchvision does not load with torch {torch.__version__} ({first}): install the two built "
                        f"for each other, from one index: `pip uninstall -y torch torchvision`, then install both "
                        f"again (README: 'On a machine without a GPU')") from e
    return tv
