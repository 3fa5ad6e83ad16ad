"""RKD in the paper's form; the distance and angle terms are shared with `rkd_seed003`."""

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F

from kdsweep.common import native
from kdsweep.common.space import Float
from kdsweep.methods.base import Method
from kdsweep.methods.registry import register
from kdsweep.methods.softmax import cross_entropy


def _geometry(z, eps: float):
    """Gram matrix and pairwise distances (zero diagonal) of the rows of z.

    Everything below is derived from the Gram matrix, so memory is O(N^3), whatever
    the embedding width: the (N, N, D) tensor of differences is never built.
    """
    g = z @ z.t()
    sq = g.diagonal()
    off = 1 - torch.eye(z.shape[0], device=z.device, dtype=z.dtype)
    d = (sq[:, None] + sq[None, :] - 2 * g).clamp_min(eps).sqrt() * off
    return g, d, off


def rkd_distance(z_s, z_t, eps: float = 1e-12):
    """Smooth-L1 between distance matrices, each divided by its mean off-diagonal distance."""
    n = z_s.shape[0]
    pairs = max(n * (n - 1), 1)
    _, d_s, _ = _geometry(z_s, eps)
    _, d_t, _ = _geometry(z_t, eps)
    return F.smooth_l1_loss(d_s / (d_s.sum() / pairs).clamp_min(1e-6), d_t / (d_t.sum() / pairs).clamp_min(1e-6))


def _parts(z, eps: float):
    """g, h and 1/d: the (N, N) pieces the angles at each z_i are made of (`_block_angles`)."""
    g, d, off = _geometry(z, eps)
    h = g - g.diagonal()[:, None] / 2
    inv_d = off / d.clamp_min(eps ** 0.5)  # off the diagonal d >= sqrt(eps) already
    return g, h, inv_d


def _block_angles(g, h, inv_d, rows: slice):
    """A[i, j, k] for the anchors i in `rows`, before clamping, and the factor 1 / (d_ij d_ik) (its backward needs it).

    (z_j - z_i) . (z_k - z_i) = g_jk - h_ij - h_ik with h_ij = g_ij - g_ii / 2, times 1 / d_ij and 1 / d_ik:
    four passes over the (rows, N, N) block, not nine. 1 / d is 0 on the diagonal, which zeroes the terms
    with j or k equal to i.
    """
    u = inv_d[rows]
    uu = u[:, :, None] * u[:, None, :]
    return (g[None] - h[rows, :, None] - h[rows, None, :]) * uu, uu


class _AngleLoss(torch.autograd.Function):
    """sum over (i, j, k) of smooth_l1(A_s - A_t), with its gradient with respect to the student's g, h and 1/d
    computed in the same pass, a block of anchors i at a time.

    Through autograd the (N, N, N) tensors of the forward are saved and read again by a backward of about
    twenty passes, several of them over masks of bools, slow on a CPU (6 of the term's 8 ms a step at N = 100
    on one core). Here each block's forward and backward run while the block is in the core's cache, in 19
    passes in all (5 of them the teacher's), and nothing of size N^3 is kept: the gradient is three (N, N)
    tensors. The teacher's side takes no gradient.
    """

    generate_vmap_rule = True  # a fused group's rkd members compute it under vmap

    @staticmethod
    def forward(g, h, inv_d, g_t, h_t, inv_d_t, block: int, want_grad: bool):
        n = g.shape[0]
        total = g.new_zeros(())
        # under no_grad three empty tensors stand for the gradient
        dg, dh, du = (torch.zeros_like(t) if want_grad else t.new_zeros(0) for t in (g, h, inv_d))
        # A = raw * u_ij u_ik, so dA/du_ij = raw / u_ij: d_ij off the diagonal (where u_ii = 0 takes no gradient)
        d = torch.where(inv_d == 0, 0, 1 / inv_d)
        # the clamp's gradient passes where -1 <= raw <= 1, as torch's clamp does: hardtanh's backward (one fast pass,
        # not masks of bools) with its open bounds the next floats beyond -1 and 1
        edge = 1 + torch.finfo(g.dtype).eps
        for start in range(0, n, block):
            rows = slice(start, start + block)
            raw, uu = _block_angles(g, h, inv_d, rows)
            a_s, a_t = raw.clamp(-1, 1), _block_angles(g_t, h_t, inv_d_t, rows)[0].clamp_(-1, 1)
            total = total + F.smooth_l1_loss(a_s, a_t, reduction="sum")
            if not want_grad:
                continue
            # dL/d(raw): smooth L1's derivative (beta 1: the difference clamped to [-1, 1]), through the clamp
            grad_raw = torch.ops.aten.hardtanh_backward((a_s - a_t).clamp(-1, 1), raw, -edge, edge)
            grad_e = grad_raw * uu  # dL/d(g_jk - h_ij - h_ik)
            dg = dg + grad_e.sum(0)
            # A is symmetric in j and k, so the terms where h_ij (or u_ij) stands second sum as those where it stands first
            dh[rows] = -2 * grad_e.sum(2)
            du[rows] = 2 * grad_raw.mul_(raw).sum(2) * d[rows]
        return total, dg, dh, du

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*output[1:])
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx, grad_total, *_):
        dg, dh, du = ctx.saved_tensors
        return grad_total * dg, grad_total * dh, grad_total * du, None, None, None, None, None


_POINTERS = [ctypes.c_void_p] * 9
_KERNEL = native.Kernel(Path(__file__).with_name("rkd_angle.c"), {
    "rkd_angle_f32": (ctypes.c_double, [ctypes.c_long, *_POINTERS]),
    "rkd_angle_f64": (ctypes.c_double, [ctypes.c_long, *_POINTERS]),
})


class _AngleKernel(_AngleLoss):
    """_AngleLoss in C (rkd_angle.c, built by common/native.py): one vectorised pass over the n^3 / 2 distinct terms
    (the angles are symmetric in j and k), against nineteen passes over n^3; the same loss and gradient up to float
    rounding. On a CPU only, in float32 or float64, on tensors with storage (not under make_fx or torch.compile).

    Under vmap (a fused group's rkd members) each member calls the kernel in turn; the teacher's side, the same for
    every member, is not copied."""

    generate_vmap_rule = False

    @staticmethod
    def forward(g, h, inv_d, g_t, h_t, inv_d_t, block: int, want_grad: bool):
        lib = _KERNEL.library()
        fn = lib.rkd_angle_f32 if g.dtype == torch.float32 else lib.rkd_angle_f64
        args = [t.contiguous() for t in (g, h, inv_d, g_t, h_t, inv_d_t)]
        dg, sh, su = (torch.zeros_like(args[0]) for _ in range(3))
        total = fn(g.shape[0], *(t.data_ptr() for t in (*args, dg, sh, su)))
        if not want_grad:  # as _AngleLoss: three empty tensors stand for the gradient
            return g.new_tensor(total), *(g.new_zeros(0) for _ in range(3))
        # as _AngleLoss finishes them: dh from both positions of h_ij, du through u_ij = 1 / d_ij
        return g.new_tensor(total), dg, sh.mul_(-2), su.mul_(2).mul_(torch.where(inv_d == 0, 0, 1 / inv_d))

    @staticmethod
    def vmap(info, in_dims, *args):
        def member(a, dim, b):
            return a.select(dim, b) if dim is not None else a

        outs = [_AngleKernel.apply(*(member(a, d, b) for a, d in zip(args, in_dims))) for b in range(info.batch_size)]
        return tuple(torch.stack(o) for o in zip(*outs)), (0, 0, 0, 0)


# Anchors per block on a CPU: a (block, N, N) float32 block of about 512 KB (13 anchors at N = 100), so the tensors of
# one block's forward and backward stay in a core's cache. One scratch timing at N = 100, forward and backward: 4.1 ms
# a step, against 4.7 ms at 256 KB, 4.2 at 1 MB and 5.7 for the whole tensor at once.
_CPU_BLOCK = 1 << 17


def rkd_angle(z_s, z_t, eps: float = 1e-12):
    """Smooth-L1 between the angle tensors of z_s and z_t (a target: no gradient flows to it), mean over N^3."""
    n = z_s.shape[0]
    parts, target = _parts(z_s, eps), [p.detach() for p in _parts(z_t.detach(), eps)]
    block = max(1, _CPU_BLOCK // (n * n)) if z_s.device.type == "cpu" else n  # on a GPU: fewest kernels
    want_grad = torch.is_grad_enabled()  # not z_s.requires_grad: under vmap it reads False
    angle = _AngleKernel if in_c(z_s) else _AngleLoss
    return angle.apply(*parts, *target, block, want_grad)[0] / max(n, 1) ** 3


def in_c(z: torch.Tensor) -> bool:
    """Whether rkd_angle computes its term in C (_AngleKernel) for embeddings like z: in float32 or float64, where the
    kernel may run (native.Kernel.usable_for)."""
    return z.dtype in (torch.float32, torch.float64) and _KERNEL.usable_for(z.device)


@register
class RKD(Method):
    """Relational KD (Park et al., CVPR 2019): transfer the geometry of the batch - distances
    and angles between samples' embeddings - not the embeddings themselves, so widths may differ.

    The paper's form, as its peers (RepDistiller, torchdistill) compute it: the raw embeddings,
    distances divided by their mean, Huber (smooth L1) on both terms, weights 25 and 50.
    Float32 with autocast off, because bf16 Gram matrices lose the small differences the
    angles depend on. `rkd_seed003` is the notebook's form (embeddings L2-normalised first).
    """

    name = "rkd"
    summary = "RKD (paper form): CE + w_dist * distance loss + w_angle * angle loss on the raw embeddings."
    reference = "Park et al., CVPR 2019 (w_dist=25, w_angle=50, as RepDistiller)"
    needs = frozenset({"logits", "embedding"})
    space = {
        "w_dist": Float(0.5, 500.0, 25.0, log=True),
        "w_angle": Float(0.5, 1000.0, 50.0, log=True),
    }

    def embed(self, e):
        return e.float().flatten(1)

    def forward(self, s, t, y, epoch):
        with torch.autocast(s.embedding.device.type, enabled=False):
            z_s, z_t = self.embed(s.embedding), self.embed(t.embedding.detach())
            dist, angle = rkd_distance(z_s, z_t), rkd_angle(z_s, z_t)
        return {
            "ce": cross_entropy(s.logits, y),
            "dist": self.hp["w_dist"] * dist,
            "angle": self.hp["w_angle"] * angle,
        }
