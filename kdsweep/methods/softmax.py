"""Log-softmax and cross-entropy over the classes of (B, C) logits, as the methods compute them.

On a CPU torch's kernels are slow for a fused group: its log-softmax along a short last dimension costs
about 150 ns a row whatever C is (a logsumexp about 35), a group's K members make K times the rows, and
under vmap F.cross_entropy goes through a Python decomposition of nll_loss, whose first call imports
sympy (0.35 s a process). So a fused group's members (vmap's tensors) take the logsumexp form, equal
to torch's up to float rounding, and a lone member keeps torch's kernels, which are faster for its
rows alone: forward and backward on one core (`python benchmarks/class_softmax.py`), a group's
cross-entropy 1.2-2.5 times faster for 1-32 members, its log-softmax 0.7-2.3 times (faster from 4).
Other devices use torch's kernels throughout.

Not torch's faster log-softmax along the first dimension of the transposed logits: how its threads split
the rows changes the last bits, and a fused group drifted from the same trials alone (tests/test_fused.py).
Softmax itself (dist) stays torch's: in logsumexp form dist's fused members drifted likewise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from torch._C._functorch import is_batchedtensor as _in_group  # inside vmap: a fused group's K members
except ImportError:  # a torch without it: the logsumexp form everywhere on a CPU
    def _in_group(z: torch.Tensor) -> bool:
        return True


def log_softmax(z: torch.Tensor) -> torch.Tensor:
    """F.log_softmax(z, 1), in float32 or wider."""
    if z.device.type != "cpu" or not _in_group(z):
        return F.log_softmax(z.float(), 1)
    z = z.float()
    return z - z.logsumexp(1, keepdim=True)


def cross_entropy(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(z, y): the batch's mean of -log softmax(z)[y], for (B,) int64 labels y."""
    if z.device.type != "cpu" or not _in_group(z):
        return F.cross_entropy(z.float(), y)
    z = z.float()
    return (z.logsumexp(1) - z.gather(1, y.unsqueeze(1)).squeeze(1)).mean()
