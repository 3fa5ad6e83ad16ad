import torch.nn.functional as F

from kdsweep.common.space import Float
from kdsweep.methods.base import Method
from kdsweep.methods.registry import register
from kdsweep.methods.softmax import cross_entropy


@register
class LogitL2(Method):
    """Regress the teacher's raw logits (Ba & Caruana 2014 style), no temperature.

    Seed 003 uses F.mse_loss, i.e. the mean over batch and classes; we keep that
    scale so its weight 1.0 means the same here.
    """

    name = "logit_l2"
    summary = "Logit matching: CE + weight * MSE(student logits, teacher logits)."
    reference = "Ba & Caruana 2014; seed 003 (method 5, weight=1)"
    space = {"weight": Float(0.01, 10.0, 1.0, log=True)}

    def forward(self, s, t, y, epoch):
        logits = s.logits.float()
        return {
            "ce": cross_entropy(logits, y),
            "l2": self.hp["weight"] * F.mse_loss(logits, t.logits.detach().float()),
        }
