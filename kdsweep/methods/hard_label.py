from kdsweep.common.space import Float
from kdsweep.methods.base import Method
from kdsweep.methods.registry import register
from kdsweep.methods.softmax import cross_entropy


@register
class HardLabel(Method):
    """Seed 003's "CEE": the teacher's top-1 class is used as a second, hard label.

    No temperature and no soft targets: only the teacher's argmax is transferred.
    """

    name = "hard_label"
    summary = "Hard-label KD (CEE): beta * CE(student, argmax teacher) + (1 - beta) * CE(student, y)."
    reference = "seed 003 (method 2, beta=0.7)"
    space = {"beta": Float(0.0, 1.0, 0.7, floor=0.0, ceiling=1.0)}

    def forward(self, s, t, y, epoch):
        b = self.hp["beta"]
        logits = s.logits.float()
        return {
            "hard": b * cross_entropy(logits, t.logits.detach().argmax(1)),
            "ce": (1 - b) * cross_entropy(logits, y),
        }
