"""crd's negatives: a new set every step, uniform over the training split within a step and pooled over
steps, independent from one step to the next; and the sampler they replaced failing the same tests.

Statistics are chi-square statistics turned into z by Wilson and Hilferty's cube-root approximation
(exact enough at these degrees of freedom); a test fails at |z| > 3.29, a two-sided p of 0.001.
The draws are a fixed function of (seed, step, position), so every number here is the same on every run.
"""

from __future__ import annotations

import math

import pytest
import torch

import kdsweep.methods.registry  # noqa: F401 - first: crd imported before the registry meets crd_seed003 half-made
from kdsweep.common import native
from kdsweep.methods import crd
from kdsweep.methods.base import SampleIndex
from kdsweep.methods.crd import NCE_K, count_draws, draw_negatives, position_words
from kdsweep.methods.registry import METHODS
from kdsweep.models.zoo import Shapes

Z_MAX = 3.29  # two-sided p = 0.001
N_CIFAR = 45_000  # CIFAR-10's training split, where crd's 16,384 negatives are meant to run
SEED = 1234


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: exact sums, and quicker on a shared machine


def old_draws(seed: int, step: int, rows: int, k: int, total: int) -> torch.Tensor:
    """The sampler crd used before: one 32-bit key per step, xored with the raw position, hashed once."""
    mask = 0xFFFFFFFF

    def hash32(x):
        x = x & mask
        for mult in (0x7FEB352D, 0x2C1B3C6D):
            x = ((x ^ (x >> 16)) * mult) & mask
        return x ^ (x >> 16)

    key = hash32(torch.tensor(step) * 0x9E37 + (seed & mask))
    return (hash32(key ^ torch.arange(rows * k).view(rows, k)) * total) >> 32


_WORDS: dict[tuple[int, int], torch.Tensor] = {}


def new_draws(seed: int, step: int, rows: int, k: int, total: int) -> torch.Tensor:
    if (rows, k) not in _WORDS:
        _WORDS[rows, k] = position_words(rows, k, torch.device("cpu"))
    return draw_negatives(seed, torch.tensor(step), _WORDS[rows, k], total)


SAMPLERS = {"new": new_draws, "old": old_draws}


def lowbias32(x: int) -> int:
    """C. Wellons' lowbias32 of one 32-bit word, in Python's unbounded integers: what crd._mix32_ computes."""
    x ^= x >> 16
    x = x * 0x21F0AAAD & 0xFFFFFFFF
    x ^= x >> 15
    x = x * 0xD35A2D97 & 0xFFFFFFFF
    return x ^ (x >> 15)


def test_the_hash_is_lowbias32_word_for_word():
    """crd's hash in int64 tensor ops (its multiplies kept below 2^63) is the published one, to the bit."""
    g = torch.Generator().manual_seed(0)
    words = [0, 1, 2**31 - 1, 2**31, 2**32 - 1] + torch.randint(0, 2**32, (4096,), generator=g).tolist()
    assert crd._mix32_(torch.tensor(words)).tolist() == [lowbias32(w) for w in words]


def chi2(counts: torch.Tensor, expected) -> float:
    """The chi-square statistic of `counts` against `expected` counts (a number: the same in every cell)."""
    return ((counts.double() - expected) ** 2 / expected).sum().item()


def z_of(chi2_value: float, df: int) -> float:
    """A chi-square statistic with `df` degrees of freedom as a standard normal z (Wilson-Hilferty)."""
    v = 2 / (9 * df)
    return ((chi2_value / df) ** (1 / 3) - (1 - v)) / math.sqrt(v)


def repeated_sets(draw, steps: int, rows: int, k: int, total: int) -> int:
    """How many of `steps` steps drew the same multiset of negatives as an earlier step.

    A multiset is known by its counts' sums under two random integer weightings (cheaper than sorting):
    equal multisets always match, and two different ones match by chance with probability about 2^-40.
    """
    weights = torch.randint(0, 1 << 20, (total, 2), generator=torch.Generator().manual_seed(0))
    seen = set()
    for step in range(steps):
        counts = torch.bincount(draw(SEED, step, rows, k, total).flatten(), minlength=total)
        seen.add(tuple((counts[:, None] * weights).sum(0).tolist()))
    return steps - len(seen)


def within_and_pooled(draw, steps: int, rows: int, k: int, total: int) -> tuple[float, float, float]:
    """(z of the within-step chi-squares summed over steps, z of the pooled counts, z of the test of
    independence between consecutive steps: the same positions' ids, in 32 bins each, as a 32 x 32 table)."""
    within, pooled, pairs, before = 0.0, torch.zeros(total, dtype=torch.long), torch.zeros(32 * 32, dtype=torch.long), None
    for step in range(steps):
        ids = draw(SEED, step, rows, k, total).flatten()
        counts = torch.bincount(ids, minlength=total)
        within += chi2(counts, ids.numel() / total)  # a sum of independent chi-squares is one, df summed
        pooled += counts
        bins = ids * 32 // total
        if before is not None:
            pairs += torch.bincount(before * 32 + bins, minlength=32 * 32)
        before = bins
    n = steps * rows * k
    # The pair table's cells are uniform only up to the bins' unequal widths (total is not a multiple of 32).
    width = torch.bincount(torch.arange(total) * 32 // total, minlength=32).double() / total
    expected = (width[:, None] * width[None, :]).flatten() * (n - rows * k)
    return (z_of(within, steps * (total - 1)), z_of(chi2(pooled, n / total), total - 1),
            z_of(chi2(pairs, expected), 32 * 32 - 1))


# ---------------------------------------------------------------- the method draws what is tested here

def test_crd_draws_its_negatives_with_the_tested_sampler():
    shapes = Shapes((4, 2, 2), (8,), (10,))
    torch.manual_seed(SEED)
    m = METHODS["crd"]({"weight": 0.8}, shapes, shapes, 1)
    m.nce_k = 64
    index = SampleIndex(torch.tensor([3, 1, 4]), 40)
    for step in range(3):
        cols = m.contrast_index(index)
        assert torch.equal(cols[:, 0], index.ids)  # the positive first, then K negatives from all samples
        assert torch.equal(cols[:, 1:], new_draws(SEED, step, 3, 64, 40)), step
    assert m.draws.item() == m.steps == 3 and NCE_K == 16384


def test_a_cpu_draws_in_blocks_of_rows_the_ids_of_one_pass(monkeypatch):
    words = position_words(37, 64, torch.device("cpu"))
    monkeypatch.setattr(crd, "_CPU_BLOCK", 5 * 64)  # blocks of 5 rows: seven full ones and a last of 2
    for step in (0, 1, 2**32 + 5):
        one_pass = crd._ids(words, crd._key(SEED, torch.tensor(step)), 3600)
        assert torch.equal(draw_negatives(SEED, torch.tensor(step), words, 3600), one_pass), step


def test_members_of_a_study_in_lockstep_draw_each_steps_negatives_once(monkeypatch):
    """Three trials of one study (one seed) stepping together draw a step's negatives once and share them; a trial
    of another seed draws its own. Each gets what it would draw alone."""

    calls, real = [], crd.draw_negatives

    def counted(seed, step, words, total):
        calls.append(int(step))
        return real(seed, step, words, total)

    monkeypatch.setattr(crd, "draw_negatives", counted)
    shapes = Shapes((4, 2, 2), (8,), (10,))
    members = []
    for seed in (SEED, SEED, SEED, SEED + 1):
        torch.manual_seed(seed)
        members.append(METHODS["crd"]({"weight": 0.8}, shapes, shapes, 1))
        members[-1].nce_k = 64
    index = SampleIndex(torch.tensor([3, 1, 4]), 40)
    for step in range(3):
        for m in members:
            cols = m.contrast_index(index)
            assert torch.equal(cols[:, 1:], new_draws(m.seed, step, 3, 64, 40)), step
    assert calls == [0, 0, 1, 1, 2, 2]  # per step: once for the three of SEED, once for SEED + 1


def _crd_member(seed: int, k: int = 64):
    torch.manual_seed(seed)
    shapes = Shapes((4, 2, 2), (8,), (10,))
    m = METHODS["crd"]({"weight": 0.8}, shapes, shapes, 1)
    m.nce_k = k
    return m


def _counting_draws(monkeypatch) -> list[int]:
    """The steps drawn, in torch's ops or in C."""
    calls, real, real_c = [], crd.draw_negatives, crd.counted_draws

    def counted(seed, step, words, total):
        calls.append(int(step))
        return real(seed, step, words, total)

    def counted_c(seed, step, rows, k, total):
        calls.append(step)
        return real_c(seed, step, rows, k, total)

    monkeypatch.setattr(crd, "draw_negatives", counted)
    monkeypatch.setattr(crd, "counted_draws", counted_c)
    return calls


@pytest.mark.parametrize("seed, step, rows, k, total", [(0, 0, 100, 16384, 3600), (SEED, 77, 37, 64, 40),
                                                         (2**63 + 5, 2**32 + 3, 5, 5000, 45000), (7, 3, 3, 64, 1)])
def test_counted_draws_in_c_are_the_torch_draws_counted(seed, step, rows, k, total):
    """crd's C draw (crd_draw.c) gives the counts of draw_negatives' ids to the bit, for seeds and steps beyond 32
    bits too."""
    if crd._KERNEL.library() is None:
        pytest.skip("the C kernel is not built here (no C compiler?)")
    want = count_draws(draw_negatives(seed, torch.tensor(step), position_words(rows, k, torch.device("cpu")), total), total)
    assert torch.equal(crd.counted_draws(seed, step, rows, k, total), want)
    assert crd.counts_in_c(torch.device("cpu"), rows, k)


def test_a_training_step_counts_its_draws_in_c_where_it_can(monkeypatch):
    """crd's counted loss takes its counts from the C draw on a CPU (where it builds), ids and all else in torch's ops:
    the step's counts and loss are those of the torch draw."""
    if crd._KERNEL.library() is None:
        pytest.skip("the C kernel is not built here (no C compiler?)")
    calls = _counting_draws(monkeypatch)
    monkeypatch.setattr(crd, "_LAST_DRAW", (None, None))  # restored after: what this test draws stays its own
    index = SampleIndex(torch.tensor([3, 1, 4]), 40)
    m = _crd_member(SEED)
    counts = m.draw(index, counts_only=True)[1]
    assert torch.equal(counts, count_draws(new_draws(SEED, 0, 3, 64, 40), 40))
    monkeypatch.setenv(native.ENV, "0")
    crd._LAST_DRAW = (None, None)  # not the step just drawn: drawn again, in torch's ops
    assert torch.equal(_crd_member(SEED).draw(index, counts_only=True)[1], counts)
    assert calls == [0, 0]


def test_a_studys_later_trials_take_each_steps_counts_as_kept(monkeypatch):
    """Within kept_draws, trials of one seed that come one after another to the same steps draw each step once;
    each gets the counts it would draw alone (int16, the same values). Outside it nothing is kept."""
    calls = _counting_draws(monkeypatch)
    index = SampleIndex(torch.tensor([3, 1, 4]), 40)
    alone = [count_draws(new_draws(SEED, step, 3, 64, 40), 40) for step in range(3)]
    with crd.kept_draws():
        for trial in range(3):
            m = _crd_member(SEED)
            for step in range(3):
                counts = m.draw(index, counts_only=True)[1]
                assert torch.equal(counts.float(), alone[step]), (trial, step)
    assert calls == [0, 1, 2]
    assert crd._KEPT.counts == {}  # freed when the study ends
    calls.clear()
    for trial in range(2):
        m = _crd_member(SEED)
        for step in range(2):
            m.draw(index, counts_only=True)
    assert calls == [0, 1, 0, 1]


def test_kept_counts_stop_at_their_limit_and_another_seed_replaces_them(monkeypatch):
    calls = _counting_draws(monkeypatch)
    index = SampleIndex(torch.tensor([3, 1, 4]), 40)
    with crd.kept_draws(limit=2 * 3 * 40 * 2):  # two steps' int16 counts
        for seed in (SEED, SEED, SEED + 1, SEED):
            m = _crd_member(seed)
            for _ in range(3):
                m.draw(index, counts_only=True)
            assert crd._KEPT.used <= 2 * 3 * 40 * 2
    # SEED's steps 0 and 1 kept, not 2 (the second trial took it as the last draw); SEED + 1 drew all and
    # replaced them, so SEED drew all again
    assert calls == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    calls.clear()
    with crd.kept_draws():
        for _ in range(2):
            m = _crd_member(SEED, k=40_000)  # a count could pass int16's range: never kept
            for _ in range(2):
                m.draw(index, counts_only=True)
    assert calls == [0, 1, 0, 1]


# ---------------------------------------------------------------- a new set every step

@pytest.mark.parametrize("name, rows", [("new", 128), ("new", 100), ("old", 128)])
def test_every_step_draws_another_set(name, rows):
    # K = 128 keeps 3,000 steps fast. The old sampler's sets, at batch x K a power of two (2^14), depend on
    # the top 18 bits of its 32-bit key alone: 2^18 possible sets, so about 17 repeats expected in 3,000 steps;
    # independent draws of 16,384 ids out of 45,000 practically never repeat a set.
    got = repeated_sets(SAMPLERS[name], 3000, rows, 128, N_CIFAR)
    assert (got == 0) if name == "new" else (got > 5), got


@pytest.mark.slow
@pytest.mark.parametrize("name", ["new", "old"])
def test_every_step_draws_another_set_at_full_size(name):
    # crd's own K: at batch 128 the old sampler has 2^11 possible sets, about 22 repeats expected in 300 steps.
    got = repeated_sets(SAMPLERS[name], 300, 128, NCE_K, N_CIFAR)
    assert (got == 0) if name == "new" else (got > 10)


# ---------------------------------------------------------------- uniform, and independent across steps

@pytest.mark.parametrize("rows", [128, 100])
def test_draws_are_uniform_within_and_across_steps(rows):
    within, pooled, pairs = within_and_pooled(new_draws, 12, rows, NCE_K, N_CIFAR)
    assert abs(within) < Z_MAX and abs(pooled) < Z_MAX and abs(pairs) < Z_MAX, (within, pooled, pairs)


def test_the_old_sampler_fails_the_uniformity_test():
    # Its counts within a step are too even (z about -15) and its pooled counts uneven (z about -5).
    within, pooled, pairs = within_and_pooled(old_draws, 12, 128, NCE_K, N_CIFAR)
    assert abs(within) > Z_MAX and abs(pooled) > Z_MAX, (within, pooled, pairs)


def test_a_crd_study_with_kept_counts_trains_the_same_trials_drawing_each_step_once(tmp_path, monkeypatch):
    """Three trials of a crd study one after another: kept counts (what the study loop does) give every trial the
    numbers it gets when each draws its own, and the study draws each step once instead of once a trial."""
    import contextlib

    from reliability_helpers import load_trials

    from kdsweep.study import loop
    from kdsweep.study.config import resolve

    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "cache"))  # one teacher for both studies
    calls = _counting_draws(monkeypatch)
    values = {}
    for kept in (True, False):
        monkeypatch.chdir(tmp_path)
        folder = tmp_path / f"kept-{kept}"
        (folder / "mlruns").mkdir(parents=True)
        if not kept:
            monkeypatch.setattr(METHODS["crd"], "study_scope", classmethod(lambda cls: contextlib.nullcontext()))
        storage = f"sqlite:///{folder}/mlruns/optuna.db"
        cfg = resolve("crd", {"dataset": "digits", "data_size": 300, "trials": 3, "epochs": 2, "pruner": "none",
                              "device": "cpu", "study_name": "kept", "storage": storage,
                              "tracking_uri": f"sqlite:///{folder}/mlruns/mlflow.db"})
        calls.clear()
        loop.run_study(cfg, say=lambda s: None)
        trials = sorted(load_trials(storage, "kept"), key=lambda t: t.number)
        values[kept] = [(t.params, t.value, t.user_attrs["test_acc"]) for t in trials]
        steps = len(set(calls))
        assert len(calls) == (steps if kept else 3 * steps), (kept, calls)
    assert values[True] == values[False]
