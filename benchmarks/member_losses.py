"""A fused group's losses under vmap (as fused.py computes them) against the same losses written over a leading
member dimension: whether writing each method's loss a second time, batched by hand, would pay.

    python benchmarks/member_losses.py [--rounds 2]

`ce`, `vanilla_kd`, `pkt` and `cosine` only (the cheap methods, where vmap's overhead weighs most), written out
here over (K, B, ...) student outputs; `fused._Heads._batched` is patched to call them. One fused group of 16
MNIST-1D MLP students on one thread with kdsweep's malloc settings, timed per epoch as
benchmarks/group_composition.py does, both ways alternated. docs/performance.md ("What the targets of issue 20
still need") records the result: at most 10%, not worth a second copy of every loss.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from group_composition import per_epoch, setup  # noqa: E402

from kdsweep.training import fused  # noqa: E402

EPS = 1e-7  # pkt's guard, as methods/pkt.py


def _per_member(v, ndim: int):
    """A hyperparameter for a (K, ...) tensor of `ndim` dims: a float as it is, a (K,) tensor as (K, 1, ..., 1)."""
    return v.view(-1, *[1] * (ndim - 1)) if isinstance(v, torch.Tensor) else v


def _ce(logits, y):
    k, b, c = logits.shape
    return F.cross_entropy(logits.float().reshape(k * b, c), y.repeat(k), reduction="none").view(k, b).mean(1)


def _probs(e):
    z = e.float()
    z = z / (z.norm(dim=-1, keepdim=True) + EPS)
    kernel = (z @ z.transpose(-1, -2) + 1) / 2
    return kernel / kernel.sum(-1, keepdim=True)


def by_hand(name: str, s, t, y, hp) -> dict:
    """Method `name`'s loss terms for K members at once: s's tensors are (K, B, ...), each term (K,)."""
    if name == "ce":
        return {"ce": _ce(s.logits, y)}
    if name == "vanilla_kd":
        temp, a = hp["temperature"], hp["alpha"]
        s_log = F.log_softmax(s.logits.float() / _per_member(temp, 3), -1)
        t_log = F.log_softmax(t.logits.float() / _per_member(temp, 3), -1)
        kl = (t_log.exp() * (t_log - s_log)).sum((-2, -1)) / s.logits.shape[1] * temp * temp
        return {"kd": a * kl, "ce": (1 - a) * _ce(s.logits, y)}
    if name == "pkt":
        p_s, p_t = _probs(s.embedding), _probs(t.embedding)
        kl = (p_t * ((p_t + EPS).log() - (p_s + EPS).log())).mean((-2, -1))
        return {"ce": _ce(s.logits, y), "pkt": hp["weight"] * kl}
    if name == "cosine":
        cos = F.cosine_similarity(s.embedding.float(), t.embedding.float().expand_as(s.embedding), dim=-1, eps=1e-8)
        return {"ce": _ce(s.logits, y), "cos": hp["weight"] * (1 - cos).mean(-1)}
    raise KeyError(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    data, teacher = setup("kdsweep-member-losses-")
    under_vmap = fused._Heads._batched

    def direct(self, s_mine, t_out, y, epoch):  # methods with heads keep vmap (none of these four has any)
        if self.params:
            return under_vmap(self, s_mine, t_out, y, epoch)
        return by_hand(self.runs[0].m.method.name, s_mine, t_out, y, self.hp)

    compositions = {"4 methods x 4": ["ce", "vanilla_kd", "pkt", "cosine"] * 4,
                    "ce, vanilla_kd x 8": ["ce", "vanilla_kd"] * 8, "pkt, cosine x 8": ["pkt", "cosine"] * 8}
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    for r in range(args.rounds):
        for label, names in compositions.items():
            fused._Heads._batched = under_vmap
            a = per_epoch(names, data, teacher, 4)
            fused._Heads._batched = direct
            b = per_epoch(names, data, teacher, 4)
            print(f"round {r + 1}, {label:<20} under vmap {a:.3f} s an epoch, by hand {b:.3f} s ({a / b:.2f}x)", flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
