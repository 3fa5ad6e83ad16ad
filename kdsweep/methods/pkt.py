import torch

from kdsweep.common.space import Float
from kdsweep.methods.base import Method
from kdsweep.methods.registry import register
from kdsweep.methods.softmax import cross_entropy

EPS = 1e-7  # the authors' guard against log(0) and 0 / 0


def conditional_probs(e):
    """P[i, j] = K(i, j) / sum_k K(i, k) with the cosine kernel K = (cos + 1) / 2, self-pairs kept."""
    z = e.float().flatten(1)
    z = z / (z.norm(dim=1, keepdim=True) + EPS)
    k = (z @ z.t() + 1) / 2
    return k / k.sum(1, keepdim=True)


def pkt_loss(e_s, e_t):
    """KL(P_t || P_s) per entry, averaged over all N^2 entries (as the authors' code)."""
    p_s, p_t = conditional_probs(e_s), conditional_probs(e_t.detach())
    return (p_t * ((p_t + EPS).log() - (p_s + EPS).log())).mean()


@register
class PKT(Method):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018): the student matches, for
    every sample, the teacher's conditional distribution over the batch, built from the cosine
    kernel (cos + 1) / 2. Only similarities are compared, so embedding widths may differ.

    The mean over N^2 entries makes the term small (about 1/N of a per-anchor KL), hence the
    large weights: RepDistiller uses 30000. Seed 003's softmax form is `pkt_seed003`.
    """

    name = "pkt"
    summary = "PKT (paper form): CE + weight * mean KL between the (cos + 1) / 2 kernels' conditional probabilities."
    reference = "Passalis & Tefas, ECCV 2018 (authors' code; weight 30000 as RepDistiller)"
    needs = frozenset({"logits", "embedding"})
    space = {"weight": Float(100.0, 1e6, 3e4, log=True)}

    def forward(self, s, t, y, epoch):
        with torch.autocast(s.embedding.device.type, enabled=False):
            kl = pkt_loss(s.embedding, t.embedding)
        return {
            "ce": cross_entropy(s.logits, y),
            "pkt": self.hp["weight"] * kl,
        }
