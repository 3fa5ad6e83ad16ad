"""Python objects as study settings: models and data handed to the API get names a StudyConfig can hold.

A name must find the same study again when a notebook is run twice, so it comes from what the
object *is*, never from where it happens to live in memory:
  * a function or class importable by its module path (not defined in `__main__`) becomes that
    spec, `package.module:name`, which other processes (`kdsweep report`) can rebuild too;
  * anything else is registered in this process under a name made from its kind and a digest
    of its content (data: the tensors; a model instance: its class and weights; a notebook
    function: its name and code). Such a study is confirmed and reported from the same process.
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from typing import Any

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
    from kdsweep.training.teacher import cache_dir

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

    if isinstance(model, nn.Module):
        name = f"py.{type(model).__name__}-{model_digest(model)[:10]}"  # an instance: its class and its weights
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
        name = f"py.data-{_content_digest(data)}"
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
