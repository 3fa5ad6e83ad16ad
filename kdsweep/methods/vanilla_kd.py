from kdsweep.common.space import Float
from kdsweep.methods.base import Method
from kdsweep.methods.registry import register
from kdsweep.methods.softmax import cross_entropy, log_softmax


def kd_kl(s_logits, t_logits, T: float):
    """Hinton's soft-target term: T^2 * KL(softmax(t/T) || softmax(s/T)), batch-mean.

    T^2 keeps the gradient scale independent of T (Hinton et al. 2015, sec. 2).
    Computed in float32: under bf16 autocast the KL of near-equal distributions
    otherwise rounds to negative values.
    """
    s_log = log_softmax(s_logits.float() / T)
    t_log = log_softmax(t_logits.detach().float() / T)
    # F.kl_div(s_log, t_log, reduction="batchmean", log_target=True), written out: vmap (a fused group's
    # batched losses) has no batching rule for kl_div and would loop over the members.
    return (t_log.exp() * (t_log - s_log)).sum() / s_log.shape[0] * T * T


@register
class VanillaKD(Method):
    name = "vanilla_kd"
    summary = "Hinton KD: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE."
    reference = "Hinton et al. 2015; seeds 000-004"
    space = {
        # Up to 100, where KD approaches logit matching (Hinton et al. sec. 2.1): tuned on MNIST-1D it sat at
        # 17.6, the top of the former [1, 20] (issue 23).
        "temperature": Float(1.0, 100.0, 4.0, log=True),
        "alpha": Float(0.0, 1.0, 0.7, floor=0.0, ceiling=1.0),
    }

    def forward(self, s, t, y, epoch):
        a = self.hp["alpha"]
        return {
            "kd": a * kd_kl(s.logits, t.logits, self.hp["temperature"]),
            "ce": (1 - a) * cross_entropy(s.logits, y),
        }
