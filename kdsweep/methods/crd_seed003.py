import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdsweep.common.space import Float
from kdsweep.methods.base import Method
from kdsweep.methods.crd import DIM
from kdsweep.methods.registry import register
from kdsweep.methods.softmax import cross_entropy


@register
class CRDSeed003(Method):
    """Contrastive representation distillation as seed 003's notebook computes it: in-batch.

    Both embeddings go through a trainable linear head to a common 128-d space (as in
    Tian et al.) and are L2-normalised; the student's i-th sample must pick the teacher's
    i-th sample among the batch (InfoNCE, other samples are negatives). There is no
    memory bank, so the number of negatives is the batch size minus one, and the loss is
    one-directional. The paper's memory-bank NCE is `crd`.
    """

    name = "crd_seed003"
    summary = "CRD (seed 003's notebook form, in-batch): CE + weight * InfoNCE(proj(student emb), proj(teacher emb)) at temperature tau."
    reference = "seed 003 (method 8, weight=1, tau=0.07), after Tian et al. 2020"
    needs = frozenset({"logits", "embedding"})
    space = {
        "weight": Float(0.05, 10.0, 1.0, log=True),
        "tau": Float(0.02, 1.0, 0.07, log=True),
    }

    def __init__(self, hp, student, teacher, epochs):
        super().__init__(hp, student, teacher, epochs)
        self.proj_s = nn.Linear(math.prod(student.embedding), DIM)
        self.proj_t = nn.Linear(math.prod(teacher.embedding), DIM)

    def forward(self, s, t, y, epoch):
        h_s = self.proj_s(s.embedding.flatten(1))
        h_t = self.proj_t(t.embedding.detach().flatten(1))
        with torch.autocast(h_s.device.type, enabled=False):
            z_s = F.normalize(h_s.float(), dim=1, eps=1e-6)
            z_t = F.normalize(h_t.float(), dim=1, eps=1e-6)
            sim = z_s @ z_t.t() / self.hp["tau"]
            nce = cross_entropy(sim, torch.arange(sim.shape[0], device=sim.device))
        return {
            "ce": cross_entropy(s.logits, y),
            "nce": self.hp["weight"] * nce,
        }
