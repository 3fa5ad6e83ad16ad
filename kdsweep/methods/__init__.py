"""Distillation methods: one file per method, each a small `Method` class (base.py) with its own search
space (space.py), found by the registry (registry.py) at import: adding a method is adding one file.
"""

import importlib
import pkgutil

# Found here, when the package is first imported, rather than in registry.py: a method module imported first
# (`import kdsweep.methods.crd`) then finds every other one complete, whichever imports which.
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "registry", "space"):
        importlib.import_module(f"{__name__}.{_mod.name}")
