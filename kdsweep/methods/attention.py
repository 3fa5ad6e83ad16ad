import torch.nn.functional as F

from . import register
from .base import Method
from .fitnet import common_hw, pool_hw
from ..space import Float


def attention_map(f, hw, eps: float = 1e-6):
    """Mean over channels of squared activations, pooled to `hw`, flattened, L2-normalised per sample."""
    a = pool_hw(f.float().pow(2).mean(1, keepdim=True), hw)
    return F.normalize(a.flatten(1), dim=1, eps=eps)


@register
class Attention(Method):
    """Attention transfer: match *where* the teacher's last map is active, not its values.

    Channel counts never matter (the map is a channel mean), so no head is needed; the
    two maps are compared at the smaller spatial size. MSE is a mean over positions, hence
    the large weights (seed 003: 250; Zagoruyko & Komodakis' code: beta/2 = 500).
    """

    name = "attention"
    summary = "Attention transfer: CE + beta * MSE(normalised spatial attention maps)."
    reference = "Zagoruyko & Komodakis 2017; seed 003 (method 4, beta=250)"
    needs = frozenset({"logits", "feature"})
    space = {"beta": Float(1.0, 1e4, 250.0, log=True)}

    def forward(self, s, t, y, epoch):
        f_s, f_t = s.feature, t.feature.detach()
        hw = common_hw(f_s, f_t)
        return {
            "ce": F.cross_entropy(s.logits.float(), y),
            "at": self.hp["beta"] * F.mse_loss(attention_map(f_s, hw), attention_map(f_t, hw)),
        }
