"""Log-softmax and cross-entropy over the classes of (B, C) logits, as the methods compute them.

They equal torch's up to float rounding, written with logsumexp. On a CPU torch's own are slow for few
classes: its log-softmax along a short last dimension costs about 150 ns a row whatever C is (a
logsumexp about 35), and under vmap (a fused group's losses) F.cross_entropy goes through a Python
decomposition of nll_loss, whose first call imports sympy (0.35 s a process). On one core, forward and
backward, `python benchmarks/class_softmax.py`: a fused group's cross-entropy 1.3-2.4 times faster for
1-32 members, its log-softmax 0.7-2.1 times (faster from 4 members); a lone member's cross-entropy
half as fast (0.16 ms against 0.08), which whole groups of one member per method do not show
(docs/performance.md, "Cross-entropy over few classes"). Other devices use torch's kernels.
Not torch's faster log-softmax along the first dimension of the transposed logits: how its threads split
the rows changes the last bits, and a fused group drifted from the same trials alone (tests/test_fused.py).
Softmax itself (dist) stays torch's: in logsumexp form dist's fused members drifted likewise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log_softmax(z: torch.Tensor) -> torch.Tensor:
    """F.log_softmax(z, 1), in float32 or wider."""
    if z.device.type != "cpu":
        return F.log_softmax(z.float(), 1)
    z = z.float()
    return z - z.logsumexp(1, keepdim=True)


def cross_entropy(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(z, y): the batch's mean of -log softmax(z)[y], for (B,) int64 labels y."""
    if z.device.type != "cpu":
        return F.cross_entropy(z.float(), y)
    z = z.float()
    return (z.logsumexp(1) - z.gather(1, y.unsqueeze(1)).squeeze(1)).mean()
