"""Python objects as study settings: models and data handed to the API get names a StudyConfig can hold.

A name must find the same study again when a notebook is run twice, so it comes from what the
object *is*, never from where it happens to live in memory:
  * a function or class importable by its module path (not defined in `__main__`) becomes that
    spec, `package.module:name`, which other processes (`kdsweep report`) can rebuild too;
  * anything else is registered in this process under a readable name and a digest of its
    content (data: the tensors; a model instance: its weights; a notebook function: its code). The
    readable part is the variable the calling code holds the object in (`teacher = nn.Sequential(...)`
    gives `py.teacher-<digest>`), else its class (a module) or `data`; a function's is its own name.
    Such a study is confirmed and reported from the same process.
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from typing import Any

from kdsweep.common.cache import cache_dir
from kdsweep.common.errors import UserError

# API keywords that may hold objects -> the StudyConfig field their name goes into.
OBJECT_KEYS = {"teacher": "teacher", "student": "student", "data": "dataset"}


def name_all(flags: dict[str, Any]) -> dict[str, Any]:
    """`flags` with every object among teacher, student and data replaced by its name (data goes to `dataset`)."""
    out = dict(flags)
    if "data" in out and out.get("dataset") is not None:
        raise UserError("give data= or dataset=, not both")
    teacher = out.get("teacher")
    for key, field in OBJECT_KEYS.items():
        if key not in out:
            continue
        value = out.pop(key)
        out[field] = value if isinstance(value, str) else (data_name(value) if key == "data" else model_name(value))
    import torch.nn as nn

    if isinstance(teacher, nn.Module) and not out.get("teacher_checkpoint"):
        # A teacher given as a module is the trained teacher: its weights are the study's teacher, not a
        # recipe to train one. They go to a file named by their digest, as a --teacher-checkpoint would.
        out["teacher_checkpoint"] = str(_weights_file(teacher, out["teacher"]))
    return out


def _weights_file(model: Any, name: str) -> Path:
    """The module's state_dict in the kdsweep cache, written once per name (= class + weight digest)."""
    from kdsweep.common.atomic import atomic_save

    path = cache_dir() / "objects" / f"{name}.pt"
    if not path.is_file():
        atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return path


def _importable(obj: Any) -> str | None:
    """`module:qualname` when `obj` can be imported back by that path (so another process can rebuild it)."""
    module, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if not module or module == "__main__" or "<" in qual or "." in qual:
        return None
    import importlib

    try:
        return f"{module}:{qual}" if getattr(importlib.import_module(module), qual, None) is obj else None
    except Exception:
        return None


def _callers_name(obj: Any) -> str | None:
    """The variable the user's code holds `obj` in, in the first frame outside kdsweep (a notebook cell's globals, a
    function's locals): the same on every rerun, unlike its address. IPython's `_`, `_1`... never count."""
    frame = inspect.currentframe()
    try:
        while frame is not None and str(frame.f_globals.get("__name__", "")).split(".")[0] == "kdsweep":
            frame = frame.f_back
        names = [] if frame is None else sorted(k for k, v in list(frame.f_locals.items())
                                                if v is obj and k.isidentifier() and not k.startswith("_"))
        return names[0] if names else None
    finally:
        del frame  # a frame holds its locals: never keep it alive


def _code_digest(fn: Any) -> str:
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):
        text = getattr(fn, "__qualname__", type(fn).__name__)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def model_name(model: Any) -> str:
    """The name a model object is studied under: its import path, or a registered name."""
    import torch.nn as nn

    from kdsweep.common.digests import model_digest
    from kdsweep.models import specs

    if isinstance(model, nn.Module):  # an instance: the user's name for it (or its class), and its weights
        name = f"py.{_callers_name(model) or type(model).__name__}-{model_digest(model)[:10]}"
    elif callable(model):
        spec = _importable(model)
        if spec:
            return spec
        name = f"py.{getattr(model, '__name__', type(model).__name__)}-{_code_digest(model)}"
    else:
        raise UserError(f"a model must be a name or spec string, an nn.Module or a factory; got {type(model).__name__}")
    return specs.register(name.replace("<", "").replace(">", ""), model)


def data_name(data: Any) -> str:
    """The name a data object is studied under: its import path (a function), or a registered content digest."""
    from kdsweep.data import dispatch

    if callable(data) and not isinstance(data, (tuple, list, dict)):
        spec = _importable(data)
        if spec:
            return spec
        name = f"py.{getattr(data, '__name__', 'data')}-{_code_digest(data)}"
    else:
        name = f"py.{_callers_name(data) or 'data'}-{_content_digest(data)}"
    dispatch.register(name, data)
    return name


def _content_digest(data: Any) -> str:
    import torch

    from kdsweep.common.digests import tensor_digest

    if isinstance(data, dict):
        keys = ("train_x", "train_y", "test_x", "test_y")
        missing = [k for k in keys if k not in data]
        if missing:
            raise UserError(f"data dict lacks {', '.join(missing)}; give train_x, train_y, test_x, test_y")
        parts = [data[k] for k in keys]
    elif isinstance(data, (tuple, list)) and len(data) == 4:
        parts = list(data)
    else:
        raise UserError(f"data must be (train_x, train_y, test_x, test_y), a dict with those keys, or a function "
                        f"returning either; got {type(data).__name__}")
    h = hashlib.sha256()
    for p in parts:
        h.update(tensor_digest(torch.as_tensor(p)).encode())
    return h.hexdigest()[:12]
