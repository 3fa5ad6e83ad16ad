import torch.nn.functional as F

from kdsweep.common.space import Float
from kdsweep.methods.base import Method
from kdsweep.methods.fitnet import common_hw, pool_hw
from kdsweep.methods.registry import register
from kdsweep.methods.softmax import cross_entropy


def attention_map(f, hw, eps: float = 1e-6):
    """Mean over channels of squared activations, pooled to `hw`, flattened, L2-normalised per sample."""
    a = pool_hw(f.float().pow(2).mean(1, keepdim=True), hw)
    return F.normalize(a.flatten(1), dim=1, eps=eps)


@register
class AttentionSeed003(Method):
    """Attention transfer as seed 003's notebook computes it when the maps differ in size: the
    *squared* map (channel mean of F^2) is pooled to the smaller size. The paper's peers pool
    the feature map first (`attention`); at equal sizes the two forms agree.
    """

    name = "attention_seed003"
    summary = "Attention transfer (seed 003's notebook form): CE + beta * MSE(normalised attention maps, squared map pooled)."
    reference = "seed 003 (method 4, beta=250), after Zagoruyko & Komodakis 2017"
    needs = frozenset({"logits", "feature"})
    space = {"beta": Float(1.0, 1e4, 250.0, log=True)}

    def forward(self, s, t, y, epoch):
        f_s, f_t = s.feature, t.feature.detach()
        hw = common_hw(f_s, f_t)
        return {
            "ce": cross_entropy(s.logits, y),
            "at": self.hp["beta"] * F.mse_loss(attention_map(f_s, hw), attention_map(f_t, hw)),
        }
