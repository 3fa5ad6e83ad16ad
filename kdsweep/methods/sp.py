import torch
import torch.nn.functional as F

from kdsweep.common.space import Float
from kdsweep.methods.base import Method
from kdsweep.methods.registry import register
from kdsweep.methods.softmax import cross_entropy


def sp_loss(f_s, f_t):
    """(1 / b^2) * ||normalize(G_t) - normalize(G_s)||_F^2 with G = F F^T on flattened
    features and row-wise L2 normalisation (Tung & Mori, eq. 2-4)."""
    a = f_s.float().flatten(1)
    b = f_t.detach().float().flatten(1)
    g_s = F.normalize(a @ a.t(), dim=1, eps=1e-8)
    g_t = F.normalize(b @ b.t(), dim=1, eps=1e-8)
    n = a.shape[0]
    return (g_t - g_s).pow(2).sum() / (n * n)


@register
class SP(Method):
    """Similarity-preserving KD: samples the teacher finds alike, the student should too.

    Only the b x b similarity matrices are compared, so channel counts and spatial sizes
    may differ, and an MLP's hidden vector serves as well as a flattened conv map.
    Computed in float32 with autocast off: bf16 Gram matrices of wide maps are too coarse.
    """

    name = "sp"
    summary = "Similarity-preserving KD: CE + gamma * mean squared gap of row-normalised batch Gram matrices."
    reference = "Tung & Mori, ICCV 2019 (gamma=3000 on CIFAR-10)"
    needs = frozenset({"logits", "feature"})
    space = {"gamma": Float(1.0, 1e4, 3000.0, log=True)}

    @classmethod
    def unsupported(cls, student, teacher):
        # Unlike other feature methods, spatial maps are not needed: features are flattened.
        return None if teacher is not None else f"{cls.name} needs a teacher"

    def forward(self, s, t, y, epoch):
        with torch.autocast(s.feature.device.type, enabled=False):
            loss = sp_loss(s.feature, t.feature)
        return {
            "ce": cross_entropy(s.logits, y),
            "sp": self.hp["gamma"] * loss,
        }
