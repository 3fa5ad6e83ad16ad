from kdsweep.methods.base import Method
from kdsweep.methods.registry import register
from kdsweep.methods.softmax import cross_entropy


@register
class CE(Method):
    name = "ce"
    summary = "The student alone, trained with cross-entropy: the baseline every method must beat."
    reference = "seeds 000-003"
    uses_teacher = False

    def forward(self, s, t, y, epoch):
        return {"ce": cross_entropy(s.logits, y)}
