"""Model cost: parameters, multiply-accumulates per image, latency. One counter for report and bench."""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from kdsweep.models.zoo import count_params

__all__ = ["count_params", "count_macs", "latency_ms"]


def count_macs(model: nn.Module, in_shape: tuple[int, ...], method: str = "forward") -> int:
    """Multiply-accumulates of one forward pass for one image (conv and linear layers only).

    Normalisation, activations and pooling are a few percent of a conv net's
    work and are left out, as in the usual MAC counts of the literature.
    `method` picks the entry point ("forward" or "taps").
    """
    total = 0

    def conv(m: nn.Conv2d, inp, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += out[0].numel() * k  # per image: out[0] drops the batch dimension

    def linear(m: nn.Linear, inp, out):
        nonlocal total
        total += out[0].numel() * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear))
    was = model.training
    model.eval()
    try:
        p = next(model.parameters())
        with torch.no_grad():
            getattr(model, method)(torch.zeros(1, *in_shape, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return total


@torch.no_grad()
def latency_ms(model: nn.Module, in_shape: tuple[int, ...], device: torch.device | str = "cpu", batch: int = 128,
               repeats: int = 10, warmup: int = 3) -> float:
    """Milliseconds per image of batched inference (median of `repeats` timed batches)."""
    device = torch.device(device)
    was = model.training
    model.eval()
    x = torch.randn(batch, *in_shape, device=device)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    model.train(was)
    times.sort()
    return 1000.0 * times[len(times) // 2] / batch
