import torch.nn.functional as F

from kdsweep.methods.registry import register
from kdsweep.methods.rkd import RKD


@register
class RKDSeed003(RKD):
    """RKD as seed 003's notebook computes it: the embeddings are L2-normalised before the
    distance and angle terms (the paper and its peers use the raw embeddings)."""

    name = "rkd_seed003"
    summary = "RKD (seed 003's notebook form): CE + w_dist * distance + w_angle * angle loss on L2-normalised embeddings."
    reference = "seed 003 (method 7, w_dist=25, w_angle=50), after Park et al. 2019"

    def embed(self, e):
        return F.normalize(e.float().flatten(1), dim=1, eps=1e-6)
