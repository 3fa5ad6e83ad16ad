"""FitNet in the paper's form, and the map-size helpers the feature methods share."""

import torch.nn as nn
import torch.nn.functional as F

from kdsweep.common.space import Float
from kdsweep.methods.base import Method
from kdsweep.methods.registry import register
from kdsweep.methods.softmax import cross_entropy


def common_hw(a, b) -> tuple[int, int]:
    """The spatial size two (B, C, H, W) maps are compared at: the smaller of each side."""
    return min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])


def pool_hw(x, hw):
    """Adaptive average pooling to `hw`; a no-op when the size already matches."""
    return x if tuple(x.shape[-2:]) == tuple(hw) else F.adaptive_avg_pool2d(x, hw)


def regressor(student: tuple[int, ...], teacher: tuple[int, ...]) -> nn.Module | None:
    """Conv + BN + ReLU from the student's (C, H, W) map to the teacher's, changing resolution itself.

    Twice the teacher's size: a stride-2 3x3 conv; half of it: a stride-2 transposed 4x4 conv (as
    RepDistiller); otherwise Romero et al.'s rule, a valid conv of kernel 1 + (H_s - H_t) (a 1x1
    conv at equal sizes), or its transpose when the student's map is the smaller. None when one
    side is larger and the other smaller.
    """
    (cs, hs, ws), (ct, ht, wt) = student, teacher
    if (hs, ws) == (2 * ht, 2 * wt):
        conv = nn.Conv2d(cs, ct, 3, stride=2, padding=1, bias=False)
    elif (2 * hs, 2 * ws) == (ht, wt):
        conv = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1, bias=False)
    elif hs >= ht and ws >= wt:
        conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt), bias=False)
    elif hs <= ht and ws <= wt:
        conv = nn.ConvTranspose2d(cs, ct, (1 + ht - hs, 1 + wt - ws), bias=False)
    else:
        return None
    return nn.Sequential(conv, nn.BatchNorm2d(ct), nn.ReLU())


@register
class FitNet(Method):
    """Hint learning (Romero et al., ICLR 2015): a trainable regressor maps the student's last map
    onto the teacher's, and MSE pulls the two together. The regressor is conv + BN + ReLU that
    reaches the teacher's spatial size itself (see `regressor`), as RepDistiller and torchdistill
    build it; it is a head of the method, optimised with the student and never kept in it.
    RepDistiller's weight is 100. The seed notebooks' plain conv + pooling is `fitnet_seed003`.
    """

    name = "fitnet"
    summary = "FitNet hint (paper form): CE + weight * MSE(conv+BN+ReLU regressor(student map) at the teacher's size, teacher map)."
    reference = "Romero et al., ICLR 2015 (regressor as RepDistiller/torchdistill; weight 100 as RepDistiller)"
    needs = frozenset({"logits", "feature"})
    space = {"weight": Float(0.1, 1e4, 100.0, log=True)}

    @classmethod
    def unsupported(cls, student, teacher):
        why = super().unsupported(student, teacher)
        if why is None and regressor(student.feature, teacher.feature) is None:
            why = (f"{cls.name} cannot regress a {student.feature[1]}x{student.feature[2]} map onto a "
                   f"{teacher.feature[1]}x{teacher.feature[2]} one (larger on one side, smaller on the other)")
        return why

    def __init__(self, hp, student, teacher, epochs):
        super().__init__(hp, student, teacher, epochs)
        self.regressor = regressor(student.feature, teacher.feature)

    def forward(self, s, t, y, epoch):
        r = self.regressor(s.feature)
        return {
            "ce": cross_entropy(s.logits, y),
            "hint": self.hp["weight"] * F.mse_loss(r.float(), t.feature.detach().float()),
        }
