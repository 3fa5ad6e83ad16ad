"""The report's metrics against values worked out by hand."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from kdsweep.report import metrics


def test_ece_tiny_case():
    # Five samples, two classes. Top-class confidence / correct?
    #   0.95 yes, 0.92 no  -> bin (0.9, 1.0]: |0.935 - 0.5| * 2/5 = 0.174
    #   0.75 yes           -> bin (0.7, 0.8]: |0.75 - 1|   * 1/5 = 0.05
    #   0.65 no            -> bin (0.6, 0.7]: |0.65 - 0|   * 1/5 = 0.13
    #   0.55 yes           -> bin (0.5, 0.6]: |0.55 - 1|   * 1/5 = 0.09
    probs = torch.tensor([[0.95, 0.05], [0.92, 0.08], [0.25, 0.75], [0.65, 0.35], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 1, 1, 1])
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.174 + 0.05 + 0.13 + 0.09, abs=1e-6)


def test_ece_bins_are_closed_on_the_right():
    # Two bins (0, .5] and (.5, 1]: confidence 0.5 (correct) and 0.75 (wrong) fall in different bins:
    # |0.5 - 1| * 1/2 + |0.75 - 0| * 1/2 = 0.625 (one shared bin would give |0.625 - 0.5| = 0.125).
    probs = torch.tensor([[0.5, 0.5], [0.75, 0.25]])
    labels = torch.tensor([0, 1])
    assert metrics.expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.625)


def test_ece_perfectly_calibrated_is_zero():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert metrics.expected_calibration_error(probs, torch.tensor([0, 1])) == 0.0


def test_accuracy_nll_entropy():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    labels = torch.tensor([1, 0])
    # argmax of a tie is the first class -> sample 0 wrong, sample 1 right
    assert metrics.accuracy(logits, labels) == 0.5
    p1 = math.exp(2) / (math.exp(2) + 1)
    assert metrics.nll(logits, labels) == pytest.approx((math.log(2) - math.log(p1)) / 2, rel=1e-6)
    h1 = -(p1 * math.log(p1) + (1 - p1) * math.log(1 - p1))
    assert metrics.entropy(logits) == pytest.approx((math.log(2) + h1) / 2, rel=1e-6)
    assert metrics.entropy(torch.zeros(3, 4)) == pytest.approx(math.log(4), rel=1e-6)


def test_agreement():
    s = torch.tensor([[9.0, 0, 0], [0, 9, 0], [0, 0, 9], [0, 9, 0]])
    t = torch.tensor([[9.0, 0, 0], [0, 0, 9], [0, 0, 9], [9, 0, 0]])
    assert metrics.agreement(s, t) == 0.5


def test_kl_is_teacher_to_student():
    # Student uniform (.5, .5); teacher (.75, .25) from logits (ln 3, 0).
    # KL(t || s) = .75 ln(.75/.5) + .25 ln(.25/.5) = 0.130812 (KL(s || t) would be 0.143841).
    s = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    t = torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0]])  # second sample: identical, KL 0
    expected = (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2
    assert metrics.kl_teacher_student(s, t) == pytest.approx(expected, rel=1e-5)
    assert metrics.kl_teacher_student(t, s) != pytest.approx(expected, rel=1e-3)


def test_cosine_logits():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0], [2.0, 2.0], [-3.0, 0.0]])
    assert metrics.cosine_logits(s, t) == pytest.approx((0 + 1 - 1) / 3, abs=1e-6)


def test_all_metrics_without_teacher_leaves_comparisons_nan():
    m = metrics.all_metrics(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
    assert list(m) == list(metrics.DIRECTIONS)
    assert all(math.isnan(m[k]) for k in metrics.TEACHER_METRICS)
    assert m["acc"] == 1.0


def test_ranks_ties_directions_and_missing():
    df = pd.DataFrame({
        "acc": [0.9, 0.8, 0.9, np.nan],       # higher better: tie at 0.9 -> both rank 1, then 3
        "nll": [0.3, 0.2, 0.5, np.nan],       # lower better: 0.2 -> 1, 0.3 -> 2, 0.5 -> 3
        "ece": [0.1, np.nan, 0.05, np.nan],   # a missing value ranks after the present ones: 3
        "agree_t": [np.nan] * 4,              # no teacher: column not ranked, not averaged
    }, index=["a", "b", "c", "no_trial"])
    r = metrics.rank_table(df, {"acc": +1, "nll": -1, "ece": -1, "agree_t": +1})
    assert r["acc_rank"].tolist()[:3] == [1, 3, 1]
    assert r["nll_rank"].tolist()[:3] == [2, 1, 3]
    assert r["ece_rank"].tolist()[:3] == [2, 3, 1]
    assert r["agree_t_rank"].isna().all()
    assert r["avg_rank"].tolist()[:3] == pytest.approx([5 / 3, 7 / 3, 5 / 3])
    assert r.loc["no_trial"].isna().all()  # a row without data is not ranked


def test_mean_std_and_welch():
    assert metrics.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    m, s = metrics.mean_std([0.5])
    assert m == 0.5 and math.isnan(s)
    # Welch by hand: means 2 and 5, variances 1 and 1, n = 3 each:
    # t = -3 / sqrt(1/3 + 1/3) = -3.6742, df = (2/3)^2 / (2 * (1/3)^2 / 2) = 4
    from scipy import stats

    t = -3 / math.sqrt(2 / 3)
    assert metrics.welch_p([1, 2, 3], [4, 5, 6]) == pytest.approx(2 * stats.t.sf(abs(t), 4), rel=1e-9)
    assert metrics.welch_p([1, 2, 3], [4, 5, 6]) == pytest.approx(0.02131, abs=1e-4)
    assert math.isnan(metrics.welch_p([1.0], [2.0, 3.0]))
    assert math.isnan(metrics.welch_p([1.0, 1.0], [1.0, 1.0]))


def test_confidence_interval_matches_scipy():
    from scipy import stats

    xs = [0.81, 0.84, 0.79, 0.86, 0.83]
    lo, hi = metrics.mean_ci(xs)
    ref = stats.ttest_1samp(xs, 0.0).confidence_interval(0.95)
    assert (lo, hi) == (pytest.approx(ref.low, rel=1e-12), pytest.approx(ref.high, rel=1e-12))
    assert all(math.isnan(v) for v in metrics.mean_ci([0.8]))


def test_holm_on_fixed_numbers():
    # Sorted 0.01, 0.02, 0.04, 0.30 with m = 4: x4, x3, x2, x1 -> 0.04, 0.06, 0.08, 0.30 (already monotone).
    assert metrics.holm([0.04, 0.01, 0.30, 0.02]) == pytest.approx([0.08, 0.04, 0.30, 0.06])
    # Monotonicity: 0.01*3 = 0.03, 0.011*2 = 0.022 -> raised to 0.03; capped at 1; NaN untouched.
    out = metrics.holm([0.011, 0.01, 0.9, float("nan")])
    assert out[:3] == pytest.approx([0.03, 0.03, 0.9]) and math.isnan(out[3])
    assert metrics.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])


def test_ranking_table_tests_against_ce_with_holm_and_groups_the_best():
    """Fixed accuracies over 5 seeds: Welch p-values from scipy, Holm-corrected, and the top group."""
    from types import SimpleNamespace

    from scipy import stats

    from kdsweep.report.build import Evaluated, _ranking_table

    accs = {"ce": [0.70, 0.71, 0.69, 0.70, 0.72], "kd": [0.75, 0.76, 0.74, 0.77, 0.75],
            "dkd": [0.74, 0.77, 0.73, 0.76, 0.78], "bad": [0.60, 0.62, 0.61, 0.59, 0.60]}
    evaluated = [Evaluated(SimpleNamespace(label=k), [{"acc": a} for a in v], "5 confirmation seeds") for k, v in accs.items()]
    students = pd.DataFrame({"label": list(accs), "method": list(accs), "n": 5,
                             "acc": [np.mean(v) for v in accs.values()], "acc_std": [np.std(v, ddof=1) for v in accs.values()]})
    table, notes, rule = _ranking_table(students, evaluated, SimpleNamespace(label="ce"))
    t = table.set_index("label")
    raw = {k: stats.ttest_ind(accs[k], accs["ce"], equal_var=False).pvalue for k in ("kd", "dkd", "bad")}
    order = sorted(raw, key=raw.get)
    expect, running = {}, 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (3 - i) * raw[k]))
        expect[k] = running
    for k in raw:
        assert t.loc[k, "p_vs_ce"] == pytest.approx(raw[k], rel=1e-9)
        assert t.loc[k, "p_vs_ce_holm"] == pytest.approx(expect[k], rel=1e-9)
    assert math.isnan(t.loc["ce", "p_vs_ce_holm"])
    ci = stats.ttest_1samp(accs["kd"], 0).confidence_interval(0.95)
    assert (t.loc["kd", "ci95_low"], t.loc["kd", "ci95_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    # dkd has the best mean (0.756 against kd's 0.754); kd is not significantly below it, ce and bad are.
    assert bool(t.loc["kd", "top_group"]) and bool(t.loc["dkd", "top_group"])
    assert not t.loc["ce", "top_group"] and not t.loc["bad", "top_group"]
    assert any("Holm-corrected" in n for n in notes)
    # The rule beside the table, as computed: the best, the seeds, the number of comparisons, the level.
    assert rule == ("top group: a method not significantly below the best mean (dkd): Welch's t-test of its test accuracy "
                    "against dkd's over 5 seeds, Holm-corrected over the 3 comparisons, corrected p ≥ 0.05; – where a "
                    "method has fewer than 3 confirmation seeds")

    # Two seeds: a CI, but no p-value and no group, and a note that says why.
    two = [Evaluated(e.study, e.runs[:2], "2 confirmation seeds") for e in evaluated]
    table, notes, rule = _ranking_table(students, two, SimpleNamespace(label="ce"))
    assert table["p_vs_ce_holm"].isna().all() and table["top_group"].isna().all()
    assert rule.startswith("top group and p-values: – until every method has 3 or more confirmation seeds")
    assert any("need at least 3 confirmation seeds" in n for n in notes)
