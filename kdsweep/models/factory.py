"""Models built from a name: a built-in architecture or a spec, wrapped for taps; the study's pair
built and checked against a method's taps.
"""

from __future__ import annotations

from typing import Any

from kdsweep.common.errors import UserError
from kdsweep.models.specs import _FOUND
from kdsweep.models.taps import Tapped, check_taps
from kdsweep.models.zoo import ARCHS, Net

# What each architecture reads: images (C, H, W) unless named here; MLPs flatten any input.
_INPUTS = {"cnn1d": "signal", "cnn1d_s": "signal", "mlp1200": "any", "mlp800": "any", "mlp100": "any"}


_RANK = {"image": 3, "signal": 2}


def check_arch(name: str, in_shape: tuple[int, ...] | None = None) -> str:
    """`name` if it is a known architecture that reads inputs of `in_shape` (when given), or a model spec
    (specs.py: torchvision:NAME, timm:NAME, package.module:factory, a registered name) that resolves."""
    if name not in ARCHS:
        from kdsweep.models import specs

        return specs.check(name)
    kind = _INPUTS.get(name, "image")
    if in_shape is not None and kind != "any" and len(in_shape) != _RANK[kind]:
        fits = [a for a in ARCHS if _INPUTS.get(a, "image") in ("any", "signal" if len(in_shape) == 2 else "image")]
        raise UserError(f"architecture {name!r} reads {kind}s ({'C, L' if kind == 'signal' else 'C, H, W'}), "
                        f"not inputs of shape {tuple(in_shape)}; these do: {', '.join(fits)}")
    return name


def build_model(name: str, in_shape: tuple[int, ...], num_classes: int, feature: str | None = None,
                embedding: str | None = None) -> Net:
    """A fresh model: a built-in Net, or any nn.Module from a spec wrapped in a taps.Tapped.

    `feature` / `embedding` (module paths) override where the taps are read: the output of `feature`,
    the input of `embedding`; a built-in Net given either is wrapped too.
    """
    in_shape = tuple(in_shape)
    if name in ARCHS:
        net = ARCHS[check_arch(name, in_shape)](in_shape, num_classes)
        if feature is None and embedding is None:
            return net
        inner, found = net, None
    else:
        from kdsweep.models import specs

        inner, found = specs.construct(check_arch(name), in_shape, num_classes), _FOUND.get((name, in_shape, num_classes))
    from kdsweep.models.taps import Tapped, discover

    if found is None:
        try:
            found = discover(inner, in_shape)[:2]
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's model: one line, no traceback
            text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise UserError(f"{name}: a forward pass on inputs of shape {(2, *in_shape)} failed: "
                            f"{type(e).__name__}: {text}") from None
        if name not in ARCHS:
            _FOUND[(name, in_shape, num_classes)] = found
    return Tapped(inner, in_shape, name, feature, embedding, found)


_WHAT = {"feature": "a feature map (the output of a module)", "embedding": "an embedding (the input of a final nn.Linear)"}


def build_for(cfg: Any, role: str, in_shape: tuple[int, ...], num_classes: int) -> Net:
    """The study's teacher or student ("teacher"/"student"), built with its tap paths from the config."""
    from kdsweep.models.factory import build_model

    return build_model(getattr(cfg, role), in_shape, num_classes, getattr(cfg, f"{role}_feature", None),
                       getattr(cfg, f"{role}_embedding", None))


def pair_shapes(cfg: Any, method_cls: Any, in_shape: tuple[int, ...], num_classes: int) -> tuple[Any, Any]:
    """(student shapes, teacher shapes or None) after one checked dry forward of each model (check_taps);
    a model that cannot serve the method's taps at all is refused here, with the flag that would fix it."""
    shapes = {}
    for role in ("student", "teacher") if method_cls.uses_teacher else ("student",):
        spec = getattr(cfg, role)
        model = build_for(cfg, role, in_shape, num_classes)
        if isinstance(model, Tapped):  # a built-in Net is known to fit
            check_taps(model, in_shape, num_classes, spec)
        shapes[role] = model.shapes(in_shape)
        for tap in ("feature", "embedding"):
            if tap in method_cls.needs and getattr(shapes[role], tap) == ():
                raise UserError(f"{method_cls.name} needs {_WHAT[tap]} of the {role}, and {spec} has none found "
                                f"automatically: name its module with --{role}-{tap} PATH")
    return shapes["student"], shapes.get("teacher")
