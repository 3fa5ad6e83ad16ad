import math

import torch

from kdsweep.common.space import Float
from kdsweep.methods.base import Method
from kdsweep.methods.registry import register
from kdsweep.methods.softmax import cross_entropy, log_softmax


def _kl(log_p, log_q):
    """Batch-mean KL(p || q) from log-probabilities over dim 1."""
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


def dkd_terms(s_logits, t_logits, y, T: float):
    """(TCKD, NCKD) at temperature T, both times T^2.

    TCKD: KL between the binary (target, all non-targets) distributions.
    NCKD: KL between the distributions over the non-target classes only, renormalised.
    Both come from log_softmax/logsumexp, so they are exact and zero when student = teacher.
    """
    z_s, z_t = s_logits.float() / T, t_logits.detach().float() / T
    n, c = z_s.shape
    # By comparison, not F.one_hot: one_hot reads its input's min back to the host to check it, every step.
    gt = y[:, None] == torch.arange(c, device=y.device)

    def binary(z):
        lp = log_softmax(z)
        return torch.stack([lp.gather(1, y[:, None]).squeeze(1), torch.logsumexp(lp.masked_fill(gt, float("-inf")), 1)], 1)

    # The non-target columns of each row, in order, by gather: boolean indexing (z[~gt]) would give a
    # data-dependent shape and make the host wait for the device at every step.
    cols = torch.arange(c - 1, device=y.device)
    others = cols + (cols >= y[:, None]).long()  # (n, c-1): skip each row's target column

    def non_target(z):
        return log_softmax(z.gather(1, others))

    return _kl(binary(z_t), binary(z_s)) * T * T, _kl(non_target(z_t), non_target(z_s)) * T * T


# The official code ramps the KD terms over the first 20 of its 240 epochs.
WARMUP_SHARE = 20 / 240


@register
class DKD(Method):
    """Decoupled KD: the KD loss split into its target-class part (TCKD) and its
    non-target part (NCKD), the latter freed from KD's (1 - p_t[target]) down-weighting.

    Warm-up as the paper's official code (mdistiller): both terms are multiplied by
    min(e / warmup, 1) in the e-th epoch (1-based; the trainer's `epoch` is 0-based, so
    e = epoch + 1), warmup = 20 of 240 epochs there. Scaled to the study's epochs:
    warmup = ceil(epochs * 20 / 240), per epoch as in the official code. Studies of 12
    epochs or fewer therefore get warmup = 1, i.e. full weight from the first epoch (the
    paper's ramp spans 1/12 of training, less than one of their epochs); 24 epochs ramp
    over 2 (factors 1/2, 1), 240 over 20.
    """

    name = "dkd"
    summary = "DKD: CE + warm-up(epoch) * (alpha * TCKD + beta * NCKD) at temperature T (both T^2-scaled)."
    reference = "Zhao et al., CVPR 2022 (alpha=1, beta=8, T=4 on CIFAR-100; warm-up 20/240 epochs, scaled)"
    space = {
        "alpha": Float(0.1, 10.0, 1.0, log=True),
        "beta": Float(0.5, 20.0, 8.0, log=True),
        "temperature": Float(1.0, 10.0, 4.0, log=True),
    }

    @property
    def warmup(self) -> int:
        return max(1, math.ceil(self.epochs * WARMUP_SHARE))

    def ramp(self, epoch: int) -> float:
        return min((epoch + 1) / self.warmup, 1.0)

    def forward(self, s, t, y, epoch):
        tckd, nckd = dkd_terms(s.logits, t.logits, y, self.hp["temperature"])
        w = self.ramp(epoch)
        return {
            "ce": cross_entropy(s.logits, y),
            "tckd": w * self.hp["alpha"] * tckd,
            "nckd": w * self.hp["beta"] * nckd,
        }
