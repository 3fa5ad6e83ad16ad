"""CRD in the paper's form: NCE against a memory bank of the whole training split.

Memory: two banks of N x 128 float32 (N = training samples; 2 x 45,000 x 128 x 4 B = 46 MB
for CIFAR-10), made on the first step on the trainer's device, one pair per trial (method
instance). Per step it scores the batch against every row of both banks, (B, N) floats each
(23 MB at B = 128 on CIFAR-10), rather than gathering (B, 16385, 128) rows (1 GB), which
gives the same numbers. Where N is at most K (small datasets: MNIST-1D's 3,600 rows), the loss is
taken over those (B, N) scores, each weighted by how often it was drawn, rather than over the
(B, 16,385) drawn ones: the same sum, 4.5x fewer terms on MNIST-1D, with its gradient computed by hand in
the same pass (_CountedNCE), which keeps no bank rows. Where N is above K (CIFAR-10), each step copies both
banks (the rows autograd's backward pass needs stay as they were while the banks move in place: 2 x 23 MB
per step on CIFAR-10). It keeps the negatives' mixed position counters, B x 16,384 int64
(16 MB at B = 128), and, in a study on a CPU, each step's counts for the study's later trials
(int16, B x N a step: 0.78 GB for MNIST-1D's 30 epochs, at most 1 GiB a process; _KeptCounts).
The banks are training state, not heads: they are left out of state_dict, so checkpoints and the
extra-parameter count hold the projection heads only.
"""

import contextlib
import ctypes
import math
import os
import threading
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kdsweep.common import native
from kdsweep.common.space import Float
from kdsweep.methods.base import Method
from kdsweep.methods.registry import register
from kdsweep.methods.softmax import cross_entropy

DIM = 128  # the shared embedding width (the paper's feat_dim)
NCE_K = 16384  # negatives per sample
NCE_T = 0.07  # temperature
NCE_M = 0.5  # momentum of the bank update
EPS = 1e-7


_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # a salt, so that zeros (seed 0, step 0) are not fixed points of the mix


def _mul32_(x: torch.Tensor, m: int) -> torch.Tensor:
    """x = (x * m) mod 2^32, in place, for x in [0, 2^32), never overflowing int64 (undefined behaviour): a
    multiplier of 2^31 or more is taken as m - 2^32, the same residue, so |x * m| < 2^32 * 2^31 = 2^63, and
    the mask keeps the low 32 bits of the two's-complement product. Two passes, where multiplying m's halves
    apart took six."""
    if m >= 1 << 31:
        m -= 1 << 32
    return x.mul_(m).bitwise_and_(_MASK32)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """x = a bijection of 32-bit words (held in int64) in which every input bit flips every output bit
    with probability close to 1/2: xor-shift-multiply rounds, constants from C. Wellons'
    hash-prospector ("lowbias32"). In place: a fresh 16 MB tensor per op costs more than the op on CPU."""
    x ^= x >> 16
    _mul32_(x, 0x21F0AAAD)
    x ^= x >> 15
    _mul32_(x, 0xD35A2D97)
    x ^= x >> 15
    return x


def position_words(rows: int, k: int, device: torch.device) -> torch.Tensor:
    """(rows, k) mixed position counters, the per-position half of `draw_negatives` (the same every step)."""
    return _mix32_(torch.arange(rows * k, device=device).view(rows, k) ^ _GOLDEN)


def draw_negatives(seed: int, step: torch.Tensor, words: torch.Tensor, total: int) -> torch.Tensor:
    """ids uniform in [0, total) with replacement, one per entry of `words` (position_words), a pure
    function of (seed, step, position): a counter-based generator, computed with int64 ops on the
    device (no host sync, no state).

    The step's 32-bit key mixes seed and step; each position is mixed on its own (`words`), then
    xored with the key and mixed again. Mixing the position first matters: xoring a raw position
    range into the key (the earlier sampler) gives the same set of inputs for every key that shares
    its high bits, so at batch x K a power of two only a few thousand negative sets existed.
    Within a step the words are distinct (the mix is a bijection), which lowers the variance of the
    counts by rows x k / 2^32 (0.05% at 128 x 16,384): sampling without replacement from 2^32, not from
    the training split. Steps wrap at 2^32 (over 4 billion steps).
    """
    key = _key(seed, step)
    if words.device.type != "cpu" or torch.compiler.is_compiling():
        return _ids(words, key, total)
    # On a CPU, a block of rows at a time: the hash's dozen passes over 8-byte words are bound by memory, and a
    # block stays in the core's cache between them (1.4-2.8x faster at 100 x 16,384: benchmarks/crd_draw.py). On a
    # GPU one pass over all of them is fewest kernels.
    out = torch.empty_like(words)
    block = max(1, _CPU_BLOCK // max(1, words.shape[1]))
    for r in range(0, words.shape[0], block):
        _ids(words[r:r + block], key, total, out=out[r:r + block])
    return out


_CPU_BLOCK = 1 << 18  # words per block of `draw_negatives` on a CPU: 2 MB, about a core's cache here


def _key(seed: int, step: torch.Tensor) -> torch.Tensor:
    """The step's 32-bit key: seed and step mixed."""
    key = _mix32_((step & _MASK32) ^ ((seed & _MASK32) ^ _GOLDEN))
    return _mix32_(key ^ ((seed >> 32) & _MASK32))


_KERNEL = native.Kernel(Path(__file__).with_name("crd_draw.c"), {
    "crd_counted_draws": (None, [ctypes.c_long, ctypes.c_long, ctypes.c_uint32, ctypes.c_long, ctypes.c_void_p]),
})


def counts_in_c(device: torch.device, rows: int, k: int) -> bool:
    """Whether a step's counted draws are made in C (`counted_draws`): where the kernel may run
    (native.Kernel.usable_for) and the positions fit its 32-bit words."""
    return rows * k < 1 << 32 and _KERNEL.usable_for(device)


def counted_draws(seed: int, step: int, rows: int, k: int, total: int) -> torch.Tensor:
    """count_draws(draw_negatives(seed, step, position_words(rows, k), total), total), the same counts to the bit,
    in one C pass that writes only the (rows, total) counts (crd_draw.c): about 6x faster on one CPU core at
    100 x 16,384, where the hash's thirteen tensor passes over int64 words and the scatter were most of a draw."""
    counts = torch.zeros(rows, total, dtype=torch.float32)  # what the C writes, whatever torch's default dtype
    key = int(_key(seed, torch.tensor(step)))  # from the host's step count, on the CPU: no device read back
    _KERNEL.library().crd_counted_draws(rows, k, key, total, counts.data_ptr())
    return counts


def _ids(words: torch.Tensor, key: torch.Tensor, total: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The ids of `words` under `key`, computed in `out` where given (a new tensor otherwise)."""
    u = _mix32_(torch.bitwise_xor(words, key, out=out))  # uniform 32-bit words
    return u.mul_(total).bitwise_right_shift_(32)  # into [0, total) by multiply-shift: total < 2^31, so no overflow


# The last negatives drawn, with their key: see CRD._negatives.
_LAST_DRAW: tuple = (None, None)


class _KeptCounts:
    """Each step's counts of the counted loss, kept in int16 (exact: a count is at most K = 16,384) for the later
    trials of a study that reach the same step: its trials share one seed, so steps repeat from trial to trial,
    and on one CPU core drawing and counting a step costs about 8 ms in torch's ops (1.4 ms in C: counted_draws). Only
    within `kept_draws` (crd's study_scope, held while a study's trials run; confirmation's seeds never repeat),
    only on a CPU (a GPU draws in a few kernels), and up to `limit` bytes: MNIST-1D's 30 epochs at batch 100
    take 0.78 GB."""

    def __init__(self):
        self.limit, self.counts, self.used, self.family = 0, {}, 0, None
        self.lock = threading.Lock()  # a group's members may step on several worker threads

    def get(self, key: tuple) -> torch.Tensor | None:
        return self.counts.get(key)

    def put(self, key: tuple, counts: torch.Tensor) -> None:
        """Keep a step's counts; key: (seed, step, rows, K, total, device)."""
        family = key[:1] + key[2:]
        if self.limit == 0 or counts.device.type != "cpu" or key[3] > torch.iinfo(torch.int16).max:
            return
        with self.lock:
            if family != self.family:  # another seed or shape: the steps kept will not come again
                self._clear()
                self.family = family
            # the earliest steps: every trial of the study reaches them
            if key not in self.counts and self.used + counts.numel() * 2 <= self.limit:
                self.counts[key] = counts.to(torch.int16)
                self.used += counts.numel() * 2

    def clear(self) -> None:
        with self.lock:
            self._clear()

    def _clear(self) -> None:
        self.counts, self.used, self.family = {}, 0, None


_KEPT = _KeptCounts()


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not reported (Windows): as a small machine
        return 8 << 30


@contextlib.contextmanager
def kept_draws(limit: int | None = None):
    """Keep crd's counted draws for the trials of a study that come to the same steps again (see _KeptCounts);
    at most `limit` bytes, by default 1 GiB or a sixteenth of the machine's memory, whichever is less."""
    _KEPT.limit = limit if limit is not None else min(1 << 30, _memory_bytes() // 16)
    try:
        yield
    finally:
        _KEPT.limit = 0
        _KEPT.clear()


def count_draws(neg: torch.Tensor, total: int) -> torch.Tensor:
    """(rows, total) float32: how many times each id was drawn for each row (scatter_add: no host sync)."""
    counts = torch.zeros(neg.shape[0], total, device=neg.device)
    return counts.scatter_add_(1, neg, torch.ones(()).to(neg.device).expand(neg.shape))


def nce_loss(pos, neg, n: int):
    """The paper's NCE loss of the positives' scores pos (B,) and the negatives' neg (B, K), with the uniform noise
    distribution P_n = 1 / n: -mean_i [log h(pos_i) + sum_k log(1 - h(neg_ik))], h(x) = x / (x + K P_n)."""
    k_pn = neg.shape[1] / n
    log_d1 = (pos / (pos + k_pn + EPS)).log()
    log_d0 = (k_pn / (neg + k_pn + EPS)).log()
    return -(log_d1.sum() + log_d0.sum()) / pos.shape[0]


class _CountedNCE(torch.autograd.Function):
    """`nce_loss` of embeddings v against a bank of at most K rows, with the negatives given as counts (B, n): how
    often each bank row was drawn for each sample (k in all per row): sum_k f(p[i, draw_k]) = sum_j counts[i, j]
    f(p[i, j]). Returns the loss and, where want_grad, its gradient with respect to v, computed in the same pass.

    Written by hand because autograd's form makes about twenty passes over the (B, n) scores, forward and backward;
    this one makes seven besides its two matmuls, and keeps only the (B, 128) gradient, not the bank, so crd's
    banks move in place without copies: 1.2-1.3x faster a direction on MNIST-1D's 100 x 3,600 on one CPU core
    (benchmarks/crd_nce.py), of which its two matmuls are now about half.
    The scores are p = e / z, e = exp(v . bank_j / T). With a = K P_n + EPS, P_n = 1 / n:
      loss = -1/B [sum_i log(p_i+ / (p_i+ + a)) + sum_ij counts_ij log(K P_n / (p_ij + a))]
      dloss/dv_i = 1/(B T) [sum_j counts_ij e_ij / (e_ij + z a) bank_j - a / (p_i+ + a) bank_i+]
    where i+ is sample i's own row. No second derivative: the saved gradient is taken as constant.
    """

    @staticmethod
    def forward(v, bank, ids, counts, z, k_pn: float, want_grad: bool):
        rows, a = v.shape[0], k_pn + EPS
        e = (v @ bank.t()).div_(NCE_T).exp_()
        pos = e.gather(1, ids[:, None])[:, 0] / z
        d = torch.addcmul(e.new_full((), a / k_pn), e, 1 / (z * k_pn))  # (p + a) / (K P_n) = exp(-log_d0)
        counts = counts.to(e.dtype)
        total = torch.dot(counts.view(-1), d.log().view(-1)) - (pos / (pos + a)).log().sum()
        grad = v.new_zeros(0)  # under no_grad an empty tensor stands for the gradient
        if want_grad:
            g = e.div_(d).mul_(counts)  # dloss/d(v . bank_j) times z K P_n B T
            grad = (g @ bank).mul_(1 / (z * k_pn)).sub_((a / (pos + a))[:, None] * bank[ids]).div_(rows * NCE_T)
        return total / rows, grad

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _):
        (grad,) = ctx.saved_tensors
        return grad_loss * grad, None, None, None, None, None, None


@register
class CRD(Method):
    """Contrastive representation distillation (Tian et al., ICLR 2020), with its memory bank.

    Both embeddings go through a trainable linear head to a common 128-d space and are
    L2-normalised. Each sample is contrasted with the bank row of its own id (the positive)
    and 16,384 rows drawn uniformly (the negatives, from the product of the marginals), in
    both directions: the student's embedding against the teacher's bank and the teacher's
    against the student's; the two NCE losses are summed. Scores are exp(v . m / 0.07)
    divided by a constant Z = mean * N estimated on the first batch, as the reference does;
    after the step the batch's rows move to their new embeddings with momentum 0.5.

    The bank's initial rows come from the method's own generator and the negatives from
    `draw_negatives` of (seed, step, position), both seeded from torch's initial seed (the study's
    seed), so every trial of a study draws the same ones and the global random stream is untouched.
    RepDistiller's CIFAR loader draws negatives from other classes only; the paper's estimator, used here, draws them from all samples.
    Seed 003's in-batch InfoNCE is `crd_seed003`.
    """

    name = "crd"
    summary = "CRD (paper form): CE + weight * two-way NCE against momentum memory banks (16,384 negatives, T=0.07)."
    reference = "Tian et al., ICLR 2020 (nce_k=16384, nce_t=0.07, nce_m=0.5; weight 0.8 as RepDistiller)"
    needs = frozenset({"logits", "embedding"})
    needs_index = True
    space = {"weight": Float(0.05, 10.0, 0.8, log=True)}

    def __init__(self, hp, student, teacher, epochs):
        super().__init__(hp, student, teacher, epochs)
        self.proj_s = nn.Linear(math.prod(student.embedding), DIM)
        self.proj_t = nn.Linear(math.prod(teacher.embedding), DIM)
        self.nce_k = NCE_K
        for name in ("memory_s", "memory_t", "z_s", "z_t", "draws", "words"):  # made on first use; not in state_dict
            self.register_buffer(name, None, persistent=False)
        self.seed = torch.initial_seed()
        self.steps = 0  # draws so far: `draws` as the host counts it
        self._gen: torch.Generator | None = None

    @classmethod
    def study_scope(cls):
        return kept_draws()  # a study's trials draw the same negatives at the same steps

    def generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device).manual_seed(self.seed)
        return self._gen

    def init_memory(self, n: int, device: torch.device) -> None:
        """Both banks: n rows uniform in [-a, a], a = sqrt(3 / DIM), so rows have unit norm on average."""
        g, a = self.generator(device), math.sqrt(3 / DIM)
        self.memory_s = (torch.rand(n, DIM, generator=g, device=device) * 2 - 1) * a
        self.memory_t = (torch.rand(n, DIM, generator=g, device=device) * 2 - 1) * a
        self.z_s = self.z_t = None

    def contrast_index(self, index) -> torch.Tensor:
        """(B, 1 + K) bank rows: each sample's own id, then the step's K negatives (`draw`), as the paper lists them."""
        return torch.cat([index.ids[:, None], self.draw(index)[0]], 1)

    def draw(self, index, counts_only: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This step's negatives, (B, K) ids drawn uniformly with replacement, and, where the loss takes them as
        counts (a bank of at most K rows), how often each bank row was drawn per sample (B, n), else None.
        `counts_only`: the ids may be None where the counts were kept from an earlier trial (kept_draws).

        Drawn by `draw_negatives` from (seed, step, position) on the device: a torch.Generator cannot
        be traced into a captured graph, and the global stream must stay the trial's own.
        """
        ids = index.ids
        if self.draws is None or self.draws.device != ids.device:
            self.draws = torch.zeros((), dtype=torch.long, device=ids.device)
            self.steps = 0
        drawn = self._negatives(len(ids), index.total, counts_only)
        self.draws.add_(1)
        self.steps += 1
        return drawn

    def _words(self, rows: int) -> torch.Tensor:
        """position_words for `rows`, made on the first (full) batch the torch draw needs (the C draw needs none)."""
        w, device = self.words, self.draws.device
        if w is None or w.shape[0] < rows or w.shape[1] != self.nce_k or w.device != device:
            self.words = position_words(rows, self.nce_k, device)
        return self.words[:rows]

    def _negatives(self, rows: int, total: int, counts_only: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This step's negatives, with their counts per bank row where the loss takes them (total <= K).

        They are a pure function of (seed, step, rows, total), and the trials of a study (one seed) step
        together in lockstep: the first to ask draws and counts them (about 8 ms at 100 x 16,384 on one CPU
        core in torch's ops, 1.4 ms in C where only the counts are wanted: `counted_draws`) and the others reuse
        them. Counted on the host (`steps`, in step with the device counter `draws`), so sharing reads nothing
        back; not while compiling (a graph must draw its own, and counts them in the loss). Within `kept_draws`
        the counts are also kept for the study's later trials (_KeptCounts)."""
        global _LAST_DRAW
        if torch.compiler.is_compiling():
            return draw_negatives(self.seed, self.draws, self._words(rows), total), None
        key = (self.seed, self.steps, rows, self.nce_k, total, self.draws.device)
        last_key, drawn = _LAST_DRAW
        if last_key == key and (counts_only or drawn[0] is not None):
            return drawn
        kept = _KEPT.get(key) if counts_only else None
        if kept is not None:
            return None, kept
        if counts_only and total <= self.nce_k and counts_in_c(self.draws.device, rows, self.nce_k):
            drawn = (None, counted_draws(self.seed, self.steps, rows, self.nce_k, total))
        else:
            neg = draw_negatives(self.seed, self.draws, self._words(rows), total)
            drawn = (neg, count_draws(neg, total) if total <= self.nce_k else None)
        _LAST_DRAW = (key, drawn)
        if drawn[1] is not None:
            _KEPT.put(key, drawn[1])
        return drawn

    def _nce(self, v, bank, ids, neg, counts, z_name: str, n: int):
        """One direction's NCE loss of embeddings v against `bank`: positives `ids` (B,), negatives `neg` (B, K),
        taken as `counts` (B, n) where the bank has at most K rows (then by hand: _CountedNCE), else as the K
        drawn scores (`nce_loss`)."""
        k = neg.shape[1] if neg is not None else self.nce_k  # neg None: the counts were kept (kept_draws)
        if getattr(self, z_name) is None:  # the normalisation constant, fixed on first use: the mean drawn score * n
            with torch.no_grad():
                e_all = torch.exp(v @ bank.t() / NCE_T)
                drawn = (counts * e_all).sum() if counts is not None else torch.gather(e_all, 1, neg).sum()
                setattr(self, z_name, (torch.gather(e_all, 1, ids[:, None]).sum() + drawn) / (len(ids) * (1 + k)) * n)
        z = getattr(self, z_name)
        if counts is not None:
            return _CountedNCE.apply(v, bank, ids, counts, z, k / n, torch.is_grad_enabled())[0]
        e_all = torch.exp(v @ bank.t() / NCE_T)  # scores against every bank row: the same numbers as gathering rows
        return nce_loss(torch.gather(e_all, 1, ids[:, None])[:, 0] / z, torch.gather(e_all, 1, neg) / z, n)

    def forward(self, s, t, y, epoch, index):
        h_s = self.proj_s(s.embedding.flatten(1))
        h_t = self.proj_t(t.embedding.detach().flatten(1))
        with torch.autocast(h_s.device.type, enabled=False):
            v_s, v_t = F.normalize(h_s.float(), dim=1), F.normalize(h_t.float(), dim=1)
            n = index.total
            if self.memory_s is None or self.memory_s.shape[0] != n or self.memory_s.device != v_s.device:
                self.init_memory(n, v_s.device)
            neg, counts = self.draw(index, counts_only=n <= self.nce_k)
            if counts is None and n <= neg.shape[1]:  # not counted with the draw (while compiling): counted here
                counts = count_draws(neg, n)
            # The banks move in place below. The counted loss keeps none of their rows for its backward pass; the
            # drawn one scores against copies, whose rows the backward pass needs as they were. In place, not
            # reassigned: torch.compile keeps in-place updates of a module's buffers inside functional_call (the
            # fused path), but drops reassigned attributes.
            old_s, old_t = (self.memory_s, self.memory_t) if counts is not None else \
                (self.memory_s.clone(), self.memory_t.clone())
            nce = self._nce(v_s, old_t, index.ids, neg, counts, "z_s", n) + \
                self._nce(v_t, old_s, index.ids, neg, counts, "z_t", n)
            with torch.no_grad():
                ids = index.ids
                for bank, old, v in ((self.memory_s, old_s, v_s), (self.memory_t, old_t, v_t)):
                    bank.index_copy_(0, ids, F.normalize(old[ids] * NCE_M + v * (1 - NCE_M), dim=1))
        return {
            "ce": cross_entropy(s.logits, y),
            "nce": self.hp["weight"] * nce,
        }
