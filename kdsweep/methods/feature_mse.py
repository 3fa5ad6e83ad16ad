import torch.nn as nn
import torch.nn.functional as F

from kdsweep.common.space import Float
from kdsweep.methods.base import Method
from kdsweep.methods.fitnet import common_hw, pool_hw
from kdsweep.methods.registry import register
from kdsweep.methods.softmax import cross_entropy


def channel_normalize(f, eps: float = 1e-6):
    """Divide every spatial position's channel vector by its L2 norm (scale-free targets)."""
    return f / f.pow(2).sum(1, keepdim=True).sqrt().clamp_min(eps)


@register
class FeatureMSE(Method):
    """Seed 003's feature distillation: a 1x1 conv + BN + ReLU projects the student's map to
    the teacher's channels; both maps are channel-L2-normalised and matched with MSE.

    The weight ramps up linearly over the first half of training (seed 003), because a large
    feature loss on a random student swamps CE in the first epochs.
    """

    name = "feature_mse"
    summary = "Feature MSE: CE + weight * ramp(epoch) * MSE(norm(proj(student map)), norm(teacher map))."
    reference = "seed 003 (method 3, weight=50, ramp over the first half of the epochs)"
    needs = frozenset({"logits", "feature"})
    space = {"weight": Float(1.0, 500.0, 50.0, log=True)}

    def __init__(self, hp, student, teacher, epochs):
        super().__init__(hp, student, teacher, epochs)
        c_s, c_t = student.feature[0], teacher.feature[0]
        self.proj = nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t), nn.ReLU())

    def ramp(self, epoch: int) -> float:
        return min(1.0, (epoch + 1) / max(1, self.epochs // 2))

    def forward(self, s, t, y, epoch):
        p, f_t = self.proj(s.feature), t.feature.detach()
        hw = common_hw(p, f_t)
        mse = F.mse_loss(channel_normalize(pool_hw(p, hw).float()), channel_normalize(pool_hw(f_t, hw).float()))
        return {
            "ce": cross_entropy(s.logits, y),
            "feat": self.hp["weight"] * self.ramp(epoch) * mse,
        }
