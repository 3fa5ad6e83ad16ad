"""Models from anywhere: what `--teacher` / `--student` (and a study file's teacher/student) may name.

  NAME                    a built-in architecture (models.ARCHS) or one registered with `register`
  torchvision:NAME        torchvision.models.get_model(NAME, weights=None, num_classes=N): random weights, no download
  timm:NAME               timm.create_model(NAME, pretrained=False, num_classes=N, in_chans=C) (optional extra: kdsweep[timm])
  package.module:factory  the user's callable, given num_classes=N (and in_shape=(C, H, W) if it takes it),
                          returning an nn.Module; the current directory is importable, as for `python -m`

Every problem is one line (UserError) naming the spec and the cause. `check` is cheap (imports, looks names up,
builds nothing); `construct` builds the module.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import os
import re
import sys
from typing import Any, Callable

from kdsweep.common.errors import UserError
from kdsweep.common.torchvision_import import torchvision

PREFIXES = ("torchvision", "timm")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
SYNTAX = "a built-in name, torchvision:NAME, timm:NAME or package.module:factory"

# Models named in-process (the Python API, notebooks): name -> factory or nn.Module.
REGISTERED: dict[str, Any] = {}


# (spec, in_shape, num_classes) -> default tap paths: found by one dry forward per process, not per trial.
_FOUND: dict[tuple, tuple[str | None, str | None]] = {}


def register(name: str, factory: Any) -> str:
    """Name a factory (called like package.module:factory) or an nn.Module (copied for each build) for specs.

    Returns the name. A built-in name, or one with ':', cannot be registered.
    """
    import torch.nn as nn

    from kdsweep.models.zoo import ARCHS

    if not isinstance(name, str) or not name or ":" in name or name in ARCHS:
        raise UserError(f"cannot register a model as {name!r}: names are non-empty, have no ':' and are not built-in "
                        f"({', '.join(ARCHS)})")
    if not (callable(factory) or isinstance(factory, nn.Module)):
        raise UserError(f"cannot register {name!r}: {type(factory).__name__} is neither an nn.Module nor a factory")
    REGISTERED[name] = factory
    from kdsweep.models.specs import _FOUND

    for key in [k for k in _FOUND if k[0] == name]:  # the tap paths found for an earlier model of this name
        del _FOUND[key]
    return name


def unregister(name: str) -> None:
    REGISTERED.pop(name, None)


def kind(spec: str) -> str:
    """'builtin', 'registered', 'torchvision', 'timm' or 'factory' (syntax only)."""
    from kdsweep.models.zoo import ARCHS

    if spec in ARCHS:
        return "builtin"
    if spec in REGISTERED:
        return "registered"
    head, sep, _ = spec.partition(":")
    if not sep:
        return "unknown"
    return head if head in PREFIXES else "factory"


def check(spec: str) -> str:
    """`spec` if it names something that can be built (imports done, names looked up); UserError otherwise."""
    k = kind(spec)
    if k == "unknown":
        from kdsweep.models.zoo import ARCHS

        names = [*ARCHS, *REGISTERED]
        raise UserError(f"unknown architecture {spec!r}; known: {', '.join(names)}; or {SYNTAX.split(', ', 1)[1]}")
    if k == "torchvision":
        _torchvision_name(spec)
    elif k == "timm":
        _timm_name(spec)
    elif k == "factory":
        _factory(spec)
    return spec


def construct(spec: str, in_shape: tuple[int, ...], num_classes: int):
    """The nn.Module `spec` names, freshly built for inputs `in_shape` and `num_classes` classes."""
    import torch.nn as nn

    k = kind(spec)
    if k == "torchvision":
        tvm = torchvision().models
        return _called(spec, lambda: tvm.get_model(_torchvision_name(spec), weights=None, num_classes=num_classes))
    if k == "timm":
        timm, name = _timm_name(spec)
        chans = in_shape[0] if len(in_shape) == 3 else None
        extra = {"in_chans": chans} if chans else {}
        return _called(spec, lambda: timm.create_model(name, pretrained=False, num_classes=num_classes, **extra))
    if k == "registered":
        obj = REGISTERED[spec]
        if isinstance(obj, nn.Module):
            return copy.deepcopy(obj)  # each build its own copy, as a fresh model would be
        return _call_factory(spec, obj, in_shape, num_classes)
    if k == "factory":
        return _call_factory(spec, _factory(spec), in_shape, num_classes)
    check(spec)  # raises: unknown
    raise AssertionError(spec)


def _torchvision_name(spec: str) -> str:
    tvm = torchvision().models
    name = spec.partition(":")[2]
    known = tvm.list_models()
    if name not in known:
        close = [m for m in known if name and (name in m or m in name)][:8]
        raise UserError(f"torchvision has no model {name!r} ({spec})" + (f"; similar: {', '.join(close)}" if close else
                        "; torchvision.models.list_models() lists them"))
    return name


def _timm_name(spec: str):
    name = spec.partition(":")[2]
    if importlib.util.find_spec("timm") is None:
        raise UserError(f"{spec} needs timm, which is not installed (pip install 'kdsweep[timm]', or pip install timm)")
    import timm

    if not timm.is_model(name):
        raise UserError(f"timm has no model {name!r} ({spec}); timm.list_models() lists them")
    return timm, name


def _factory(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    if not _DOTTED.match(module_name) or not _DOTTED.match(attr):
        raise UserError(f"{spec!r} is not a model spec: use {SYNTAX}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # the user's own modules, as `python -m` finds them (installed packages first)
    importlib.invalidate_caches()  # a module written since the interpreter started (a notebook, a test) is found
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise UserError(f"{spec}: cannot import module {module_name!r}: {e} (is it on PYTHONPATH or in the current "
                        f"directory?)") from None
    except Exception as e:  # noqa: BLE001 - the user's module raised while importing
        raise UserError(f"{spec}: importing module {module_name!r} failed: {type(e).__name__}: {_line(e)}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{spec}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"{spec}: {attr!r} is a {type(obj).__name__}, not a callable returning an nn.Module")
    return obj


def _call_factory(spec: str, factory: Callable, in_shape: tuple[int, ...], num_classes: int):
    """factory(num_classes=N[, in_shape=...]): each argument passed if the factory's signature takes it."""
    kwargs: dict[str, Any] = {}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: give it what the contract promises
        params = {}
        kwargs = {"num_classes": num_classes}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in (("num_classes", num_classes), ("in_shape", tuple(in_shape))):
        if key in params or (var_kw and key == "num_classes"):
            kwargs[key] = value
    return _called(spec, lambda: factory(**kwargs))


def _called(spec: str, build: Callable):
    import torch.nn as nn

    try:
        model = build()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's (or a library's) code: one line, no traceback
        raise UserError(f"{spec}: building the model failed: {type(e).__name__}: {_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{spec}: the factory returned a {type(model).__name__}, not an nn.Module")
    return model


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""
