import torch
import torch.nn.functional as F

from . import register
from .base import Method
from ..space import Float


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
    gt = F.one_hot(y, c).bool()

    def binary(z):
        lp = F.log_softmax(z, 1)
        return torch.stack([lp.gather(1, y[:, None]).squeeze(1), torch.logsumexp(lp.masked_fill(gt, float("-inf")), 1)], 1)

    def non_target(z):
        return F.log_softmax(z[~gt].view(n, c - 1), 1)

    return _kl(binary(z_t), binary(z_s)) * T * T, _kl(non_target(z_t), non_target(z_s)) * T * T


@register
class DKD(Method):
    """Decoupled KD: the KD loss split into its target-class part (TCKD) and its
    non-target part (NCKD), the latter freed from KD's (1 - p_t[target]) down-weighting.

    The paper's 20-epoch linear warm-up of the KD terms is not used: our studies train
    for a few epochs only, and the search over alpha/beta covers the scale.
    """

    name = "dkd"
    summary = "DKD: CE + alpha * TCKD + beta * NCKD at temperature T (both T^2-scaled)."
    reference = "Zhao et al., CVPR 2022 (alpha=1, beta=8, T=4 on CIFAR-100)"
    space = {
        "alpha": Float(0.1, 10.0, 1.0, log=True),
        "beta": Float(0.5, 20.0, 8.0, log=True),
        "temperature": Float(1.0, 10.0, 4.0, log=True),
    }

    def forward(self, s, t, y, epoch):
        tckd, nckd = dkd_terms(s.logits, t.logits, y, self.hp["temperature"])
        return {
            "ce": F.cross_entropy(s.logits.float(), y),
            "tckd": self.hp["alpha"] * tckd,
            "nckd": self.hp["beta"] * nckd,
        }
