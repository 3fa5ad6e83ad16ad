"""Distillation methods: one file per method, each a small `Method` class (base.py) with its own search
space (common/space.py's types), found by the registry (registry.py) at import: adding a method is adding
one file. Importing any module of this package imports every method (and torch): what needs only the
search-space types (the command line's schema) imports kdsweep.common.space.
"""

import importlib
import pkgutil

# Found here, when the package is first imported, rather than in registry.py: a method module imported first
# (`import kdsweep.methods.crd`) then finds every other one complete, whichever imports which.
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_mod.name}")
