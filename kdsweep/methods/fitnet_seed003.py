import torch.nn as nn
import torch.nn.functional as F

from kdsweep.common.space import Float
from kdsweep.methods.base import Method
from kdsweep.methods.fitnet import common_hw, pool_hw
from kdsweep.methods.registry import register
from kdsweep.methods.softmax import cross_entropy


@register
class FitNetSeed003(Method):
    """Hint learning as the seed notebooks do it (000 and 001; kept under the `_seed003` suffix
    that every notebook form of this issue carries): a plain trainable 3x3 conv with bias (seed 001:
    16 -> 32 channels) regresses the student's last map onto the teacher's, and the maps are
    compared at the smaller spatial size, pooling the larger one. The paper's regressor
    (conv + BN + ReLU that reaches the teacher's size itself) is `fitnet`.
    """

    name = "fitnet_seed003"
    summary = "FitNet hint (seed 000/001 notebooks' form): CE + weight * MSE(conv3x3 regressor(student map), teacher map), pooled to the smaller map."
    reference = "seeds 000 (weights 0.5/0.5) and 001 (CE 0.3, MSE 0.7; conv 16 -> 32), after Romero et al. 2015"
    needs = frozenset({"logits", "feature"})
    space = {"weight": Float(0.01, 1000.0, 1.0, log=True)}

    def __init__(self, hp, student, teacher, epochs):
        super().__init__(hp, student, teacher, epochs)
        self.regressor = nn.Conv2d(student.feature[0], teacher.feature[0], 3, padding=1)

    def forward(self, s, t, y, epoch):
        r, f_t = self.regressor(s.feature), t.feature.detach()
        hw = common_hw(r, f_t)
        return {
            "ce": cross_entropy(s.logits, y),
            "hint": self.hp["weight"] * F.mse_loss(pool_hw(r, hw).float(), pool_hw(f_t, hw).float()),
        }
