import torch.nn.functional as F

from kdsweep.common.space import Float
from kdsweep.methods.base import Method
from kdsweep.methods.registry import register
from kdsweep.methods.softmax import cross_entropy


def pool_to(v, n: int):
    """Average-pool the last dim of (B, D) vectors to n entries (seeds 000/001 use avg_pool1d)."""
    return v if v.shape[1] == n else F.adaptive_avg_pool1d(v.unsqueeze(1), n).squeeze(1)


@register
class Cosine(Method):
    """Pull the student's embedding towards the teacher's direction (CosineEmbeddingLoss, target +1).

    Dimensions must agree, so the wider embedding (normally the teacher's, as in the
    seeds) is average-pooled down to the narrower one: no trainable head, and when the
    student is the wider one we pool it rather than invent teacher entries.
    """

    name = "cosine"
    summary = "Cosine hint: CE + weight * mean(1 - cos(student embedding, pooled teacher embedding))."
    reference = "PyTorch KD tutorial; seeds 000 (0.5/0.5) and 001 (CE 0.7, cosine 0.3)"
    needs = frozenset({"logits", "embedding"})
    space = {"weight": Float(0.05, 20.0, 1.0, log=True)}

    def forward(self, s, t, y, epoch):
        e_s, e_t = s.embedding.float().flatten(1), t.embedding.detach().float().flatten(1)
        n = min(e_s.shape[1], e_t.shape[1])
        cos = F.cosine_similarity(pool_to(e_s, n), pool_to(e_t, n), dim=1, eps=1e-8)
        return {
            "ce": cross_entropy(s.logits, y),
            "cos": self.hp["weight"] * (1 - cos).mean(),
        }
