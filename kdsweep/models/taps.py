"""Taps from any nn.Module: forward hooks on module paths, so the user's model needs no changes.

A :class:`Tapped` wraps a module and gives it the interface of a built-in :class:`models.Net`:

  * the feature map = the OUTPUT of a module path (default: the last module whose output is a
    spatial map (B, C, H, W), global pooling excluded; for signal inputs (B, C, L) maps count too,
    viewed as (B, C, 1, L) as models.Conv1dNet does; with no map at all, the embedding);
  * the embedding = the INPUT of a module path, flattened to (B, D) (default: the last nn.Linear
    to run, i.e. what the classifier reads).

The defaults are found once, by a dry forward with hooks on every module. Paths are
`get_submodule` paths ("layer4", "classifier.3"), as `print(model)` shows them.

Each `taps(x)` call opens its own slot (per thread: CPU workers split a teacher's batch across
threads on one module), the hooks write the tensors there and the call returns them: nothing
outlives the call, the hooks do no host sync, and the call works under torch.func.functional_call
and vmap. The wrapper's state_dict is the inner module's (no "inner." prefix), so checkpoints
kdsweep writes load into the user's plain module.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn as nn

from kdsweep.common.errors import UserError
from kdsweep.models.zoo import Net, Outputs

_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.AvgPool2d, nn.MaxPool2d,
          nn.AvgPool1d, nn.MaxPool1d)


def _first_tensor(args: Any) -> torch.Tensor | None:
    if isinstance(args, torch.Tensor):
        return args
    if isinstance(args, (tuple, list)) and args and isinstance(args[0], torch.Tensor):
        return args[0]
    return None


def _positions(t: torch.Tensor, signal: bool) -> int | None:
    """Spatial positions of a map (None: not a map): (B, C, H, W), or (B, C, L) when the inputs are signals."""
    if t.dim() == 4:
        return t.shape[2] * t.shape[3]
    if t.dim() == 3 and signal:
        return t.shape[2]
    return None


def _global_pool(module: nn.Module, x: torch.Tensor | None, out: torch.Tensor, signal: bool) -> bool:
    """A module that pools a map to one position: a pooling layer, or a parameter-free one that keeps the channels."""
    if isinstance(module, _POOLS):
        return True
    before = _positions(x, signal) if x is not None else None
    return (before or 1) > 1 and x.shape[1] == out.shape[1] and next(iter(module.parameters()), None) is None


def discover(model: nn.Module, in_shape: tuple[int, ...]) -> tuple[str | None, str | None, torch.Tensor]:
    """(default feature path, default embedding path, logits) from one dry forward (eval mode, no grad).

    Feature: the last module to finish whose output is a spatial map, not a global pooling (a 1-position
    map from a larger input, or an adaptive pool to one position); of modules that hand on the same
    tensor (a block, its last ReLU, the Sequential around them), the outermost. Embedding: the last
    nn.Linear to run.
    """
    signal = len(in_shape) == 2
    names = {m: n for n, m in model.named_modules() if n}
    order: list[tuple[str, torch.Tensor]] = []  # (path, output map) in the order modules finish
    linears: list[str] = []
    pooled: list[torch.Tensor] = []  # outputs of global poolings

    def hook(module, args, output):
        name = names[module]
        if isinstance(module, nn.Linear):
            linears.append(name)
        if not isinstance(output, torch.Tensor):
            return
        pos = _positions(output, signal)
        if pos is None:
            return
        if pos == 1 and (_global_pool(module, _first_tensor(args), output, signal) or any(output is p for p in pooled)):
            pooled.append(output)  # a module around a pooling hands on the same tensor: a summary too
            return  # the map's summary, not a map
        order.append((name, output))

    handles = [m.register_forward_hook(hook) for m in names]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(_zeros(model, in_shape))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    feature = None
    if order:
        last = order[-1][1]
        same = [(n.count("."), i, n) for i, (n, t) in enumerate(order) if t is last]
        feature = min(same)[2]
    return feature, (linears[-1] if linears else None), logits


def _zeros(model: nn.Module, in_shape: tuple[int, ...]) -> torch.Tensor:
    p = next(iter(model.parameters()), None)
    return torch.zeros(2, *in_shape, device=p.device if p is not None else "cpu",
                       dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)


def _find(model: nn.Module, path: str, spec: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        top = [n for n, _ in model.named_children()]
        raise UserError(f"{spec}: no module at {what} path {path!r} (its top-level modules: {', '.join(top) or 'none'}; "
                        f"print(model) shows every path)") from None


class Tapped(Net):
    """Any nn.Module with kdsweep's taps, read by forward hooks (see the module docstring)."""

    def __init__(self, inner: nn.Module, in_shape: tuple[int, ...], spec: str = "model",
                 feature: str | None = None, embedding: str | None = None, found: tuple | None = None):
        super().__init__()
        self.inner = inner
        self.spec = spec
        if found is None:
            found = discover(inner, tuple(in_shape))[:2]
        self.feature_path = feature or found[0]
        self.embedding_path = embedding or found[1]
        self.signal = len(in_shape) == 2
        self._local = threading.local()
        if self.feature_path is not None:
            _find(inner, self.feature_path, spec, "feature").register_forward_hook(self._feature_hook)
        if self.embedding_path is not None:
            _find(inner, self.embedding_path, spec, "embedding").register_forward_pre_hook(self._embedding_hook)

    # -- the per-call slot
    def _slot(self) -> dict | None:
        return getattr(self._local, "slot", None)

    def _feature_hook(self, module, args, output):
        slot = self._slot()
        if slot is not None:
            slot["feature"] = output

    def _embedding_hook(self, module, args):
        slot = self._slot()
        if slot is not None:
            slot["embedding"] = _first_tensor(args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def taps(self, x: torch.Tensor) -> Outputs:
        slot: dict[str, torch.Tensor] = {}
        outer = self._slot()  # a taps call inside another (a user model calling itself): restored after
        self._local.slot = slot
        try:
            logits = self.inner(x)
        finally:
            self._local.slot = outer
        e = slot.get("embedding")
        if e is not None:
            e = e.flatten(1)
        f = slot.get("feature")
        if self.feature_path is None:
            f = e  # no map anywhere: the feature is the embedding vector (an MLP's last hidden layer)
        elif f is not None and f.dim() == 3:
            f = f.unsqueeze(2)  # a signal's map (B, C, L) as an image of height 1
        return Outputs(logits, f, e)

    def describe(self) -> dict[str, str]:
        """The tap paths, for provenance: '' for a tap the model cannot give."""
        return {"feature": self.feature_path or (f"(embedding) {self.embedding_path}" if self.embedding_path else ""),
                "embedding": self.embedding_path or ""}

    # -- the inner module's weights, unprefixed: checkpoints load into the user's own module
    def state_dict(self, *args, **kwargs):
        return self.inner.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.inner.load_state_dict(state_dict, strict=strict, assign=assign)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_local", None)  # thread-local slots are per process and per call
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def __deepcopy__(self, memo):
        import copy

        new = Tapped.__new__(Tapped)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k != "_local":
                new.__dict__[k] = copy.deepcopy(v, memo)
        new._local = threading.local()
        return new


def check_taps(model: nn.Module, in_shape: tuple[int, ...], num_classes: int, spec: str) -> None:
    """One tiny dry forward in training mode (what the trainer runs): logits (batch, classes), taps of usable shapes.

    Call on a throwaway model: training mode updates batch-norm statistics.
    """
    was = model.training
    model.train()
    try:
        with torch.no_grad():
            x = _zeros(model, in_shape)
            out = model.taps(x) if hasattr(model, "taps") else Outputs(model(x), None, None)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code: say what failed in one line
        raise UserError(f"{spec}: a forward pass on inputs of shape {tuple(x.shape)} failed: "
                        f"{type(e).__name__}: {_line(e)}") from None
    finally:
        model.train(was)
    check_logits(out.logits, num_classes, spec, tuple(x.shape))
    for tap, path in (("feature", getattr(model, "feature_path", None)), ("embedding", getattr(model, "embedding_path", None))):
        if path is not None and getattr(out, tap) is None:
            raise UserError(f"{spec}: {tap} layer {path!r} does not run in the model's forward pass")
    f = out.feature
    if f is not None and f.dim() not in (2, 4):
        path = getattr(model, "feature_path", "?")
        raise UserError(f"{spec}: feature layer {path!r} outputs shape {tuple(f.shape)}; a feature must be a map "
                        f"(B, C, H, W), a signal map (B, C, L) or a vector (B, D) (choose another with --teacher-feature/"
                        f"--student-feature)")


def check_logits(logits: Any, num_classes: int, spec: str, x_shape: tuple[int, ...]) -> None:
    if not isinstance(logits, torch.Tensor):
        raise UserError(f"{spec}: the model returns a {type(logits).__name__}, not a tensor of logits (batch, classes); "
                        f"wrap it so that forward returns the logits")
    want = (x_shape[0], num_classes)
    if tuple(logits.shape) != want:
        raise UserError(f"{spec}: the model's output has shape {tuple(logits.shape)} for a batch of {x_shape[0]}, "
                        f"not (batch, classes) = {want}: the data has {num_classes} classes")


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def recorded_paths(params: Any, role: str) -> dict[str, str]:
    """The tap paths a study recorded for `role` (its parent/trial run params), as build_model's feature/embedding
    arguments: a retrained model (kdsweep confirm) reads the same layers. A built-in Net's stages are not paths."""
    out = {}
    for tap in ("feature", "embedding"):
        value = str(params.get(f"{role}_{tap}", "") or "")
        if value and all(c.isalnum() or c in "._" for c in value):
            out[tap] = value
    return out
