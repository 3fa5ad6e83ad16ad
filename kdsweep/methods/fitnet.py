import torch.nn as nn
import torch.nn.functional as F

from . import register
from .base import Method
from ..space import Float


def common_hw(a, b) -> tuple[int, int]:
    """The spatial size two (B, C, H, W) maps are compared at: the smaller of each side."""
    return min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])


def pool_hw(x, hw):
    """Adaptive average pooling to `hw`; a no-op when the size already matches."""
    return x if tuple(x.shape[-2:]) == tuple(hw) else F.adaptive_avg_pool2d(x, hw)


@register
class FitNet(Method):
    """Hint learning: a trainable 3x3 conv regresses the student's last map onto the teacher's.

    The regressor is a plain conv with bias, as in seed 001 (16 -> 32 channels); it is a
    head of the method, so it is optimised with the student and never kept in the student.
    Maps are compared at the smaller spatial size, pooling the larger one.
    """

    name = "fitnet"
    summary = "FitNet hint: CE + weight * MSE(conv3x3 regressor(student map), teacher map)."
    reference = "Romero et al. 2015; seeds 000 (weights 0.5/0.5) and 001 (CE 0.3, MSE 0.7)"
    needs = frozenset({"logits", "feature"})
    space = {"weight": Float(0.01, 100.0, 1.0, log=True)}

    def __init__(self, hp, student, teacher, epochs):
        super().__init__(hp, student, teacher, epochs)
        self.regressor = nn.Conv2d(student.feature[0], teacher.feature[0], 3, padding=1)

    def forward(self, s, t, y, epoch):
        r, f_t = self.regressor(s.feature), t.feature.detach()
        hw = common_hw(r, f_t)
        return {
            "ce": F.cross_entropy(s.logits.float(), y),
            "hint": self.hp["weight"] * F.mse_loss(pool_hw(r, hw).float(), pool_hw(f_t, hw).float()),
        }
