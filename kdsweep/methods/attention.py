import torch.nn.functional as F

from kdsweep.common.space import Float
from kdsweep.methods.base import Method
from kdsweep.methods.fitnet import common_hw, pool_hw
from kdsweep.methods.registry import register
from kdsweep.methods.softmax import cross_entropy


def at_map(f, p: float = 2.0, eps: float = 1e-12):
    """The attention map of (B, C, H, W) activations: channel mean of |F|^p, flattened, L2-normalised per sample."""
    return F.normalize(f.float().abs().pow(p).mean(1).flatten(1), dim=1, eps=eps)


@register
class Attention(Method):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017): match *where* the teacher's last map
    is active, not its values. Channel counts never matter (the map is a channel mean), so no head
    is needed. Maps of different sizes: the larger *feature map* is average-pooled to the smaller
    size before the map is taken, as mdistiller and RepDistiller do (seed 003 pooled the squared
    map: `attention_seed003`). MSE is a mean over positions, hence the large weights
    (RepDistiller and mdistiller: 1000; the authors' code: beta / 2 = 500).
    """

    name = "attention"
    summary = "Attention transfer (paper form): CE + beta * MSE(normalised attention maps, larger feature map pooled first)."
    reference = "Zagoruyko & Komodakis, ICLR 2017 (p=2; beta=1000 as RepDistiller)"
    needs = frozenset({"logits", "feature"})
    space = {"beta": Float(10.0, 1e5, 1000.0, log=True)}

    def forward(self, s, t, y, epoch):
        f_s, f_t = s.feature, t.feature.detach()
        hw = common_hw(f_s, f_t)
        a_s, a_t = at_map(pool_hw(f_s.float(), hw)), at_map(pool_hw(f_t.float(), hw))
        return {
            "ce": cross_entropy(s.logits, y),
            "at": self.hp["beta"] * F.mse_loss(a_s, a_t),
        }
