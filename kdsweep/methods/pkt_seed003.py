import torch
import torch.nn.functional as F

from kdsweep.common.space import Float
from kdsweep.methods.base import Method
from kdsweep.methods.registry import register
from kdsweep.methods.softmax import cross_entropy


def similarity_log_probs(e, sigma: float):
    """Row-wise log-softmax of cosine similarities / sigma over the *other* samples: (N, N-1).

    The diagonal is dropped rather than filled with -inf, so no 0 * inf appears in the KL. It is dropped by
    gather, not by a boolean mask, whose data-dependent shape would make the host wait for the device.
    """
    z = F.normalize(e.float().flatten(1), dim=1, eps=1e-6)
    n = z.shape[0]
    cols = torch.arange(n - 1, device=z.device)
    others = cols + (cols >= torch.arange(n, device=z.device)[:, None]).long()  # (n, n-1): row i skips column i
    return F.log_softmax((z @ z.t()).gather(1, others) / sigma, 1)


def pkt_kl(e_s, e_t, sigma: float):
    """Mean over anchors i of KL(p_t(. | i) || p_s(. | i))."""
    if e_s.shape[0] < 2:  # a single sample has no neighbours
        return e_s.float().sum() * 0
    log_ps = similarity_log_probs(e_s, sigma)
    log_pt = similarity_log_probs(e_t.detach(), sigma)
    return (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()


@register
class PKTSeed003(Method):
    """PKT as seed 003's notebook computes it: an exp(cos / sigma) kernel (a row softmax), the
    self-pairs dropped, KL summed over neighbours and averaged over anchors. The paper's
    (cos + 1) / 2 kernel is `pkt`. Float32 with autocast off, as sigma is small.
    """

    name = "pkt_seed003"
    summary = "PKT (seed 003's notebook form): CE + weight * KL between row-softmaxed cosine-similarity matrices (temperature sigma)."
    reference = "seed 003 (method 9, softmax variant, sigma=0.1, weight=2), after Passalis & Tefas 2018"
    needs = frozenset({"logits", "embedding"})
    space = {
        "weight": Float(0.1, 20.0, 2.0, log=True),
        "sigma": Float(0.02, 1.0, 0.1, log=True),
    }

    def forward(self, s, t, y, epoch):
        with torch.autocast(s.embedding.device.type, enabled=False):
            kl = pkt_kl(s.embedding, t.embedding, self.hp["sigma"])
        return {
            "ce": cross_entropy(s.logits, y),
            "pkt": self.hp["weight"] * kl,
        }
