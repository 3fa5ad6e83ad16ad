"""Evaluation metrics, ranks and significance tests: pure functions, no tracking, no I/O.

Logit-based metrics take float tensors of shape (N, C) and return Python
floats; the teacher-comparison ones take the student's logits first. The
definitions follow seed 003's evaluation table:

  acc         share of argmax predictions equal to the label
  nll         mean cross-entropy of the label (nats)
  ece         expected calibration error over 10 equal-width confidence bins
              (lo, hi]: sum over bins of |mean confidence - accuracy| * share
  agree_t     share of samples where student and teacher argmax agree
  kl_t_s      KL(teacher || student) of the softmax distributions, mean over
              samples (nats) - the direction vanilla KD minimises
  cos_logits  mean over samples of the cosine of the two logit vectors
  entropy     mean predictive entropy of the softmax (nats)
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

# Direction of every ranked metric, declared once: +1 higher is better, -1 lower is better.
# Lower entropy counts as better, as in seed 003 (a confident student); ECE covers miscalibration.
DIRECTIONS: dict[str, int] = {
    "acc": +1,
    "nll": -1,
    "ece": -1,
    "agree_t": +1,
    "kl_t_s": -1,
    "cos_logits": +1,
    "entropy": -1,
}
TEACHER_METRICS = ("agree_t", "kl_t_s", "cos_logits")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return F.cross_entropy(logits.float(), labels).item()


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """ECE of softmax probabilities (N, C): bins (0, 1/n], (1/n, 2/n], ... on the top-class confidence."""
    conf, pred = probs.float().max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # Bin i holds edges[i] < conf <= edges[i+1]; bucketize(right=False) returns exactly that i+1.
    idx = torch.bucketize(conf.double(), edges, right=False) - 1
    idx = idx.clamp(0, n_bins - 1)  # a confidence of exactly 0 cannot occur for a softmax; keep it in bin 0
    n = len(labels)
    total = 0.0
    for b in range(n_bins):
        mask = idx == b
        k = int(mask.sum())
        if k:
            total += abs(conf[mask].double().mean().item() - correct[mask].double().mean().item()) * k / n
    return total


def ece_from_logits(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    return expected_calibration_error(F.softmax(logits.float(), 1), labels, n_bins)


def agreement(student: torch.Tensor, teacher: torch.Tensor) -> float:
    return (student.argmax(1) == teacher.argmax(1)).float().mean().item()


def kl_teacher_student(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """KL(p_teacher || p_student) = sum p_t (log p_t - log p_s), mean over samples."""
    log_s = F.log_softmax(student.float(), 1)
    log_t = F.log_softmax(teacher.float(), 1)
    return (log_t.exp() * (log_t - log_s)).sum(1).mean().item()


def cosine_logits(student: torch.Tensor, teacher: torch.Tensor) -> float:
    return F.cosine_similarity(student.float().flatten(1), teacher.float().flatten(1), dim=1).mean().item()


def entropy(logits: torch.Tensor) -> float:
    log_p = F.log_softmax(logits.float(), 1)
    return -(log_p.exp() * log_p).sum(1).mean().item()


def all_metrics(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None) -> dict[str, float]:
    """Every metric of DIRECTIONS for one model; the teacher-comparison ones are NaN without teacher logits."""
    out = {"acc": accuracy(logits, labels), "nll": nll(logits, labels), "ece": ece_from_logits(logits, labels)}
    if teacher is not None:
        out.update(agree_t=agreement(logits, teacher), kl_t_s=kl_teacher_student(logits, teacher),
                   cos_logits=cosine_logits(logits, teacher))
    else:
        out.update({k: math.nan for k in TEACHER_METRICS})
    out["entropy"] = entropy(logits)
    return {k: out[k] for k in DIRECTIONS}


def rank_table(values: pd.DataFrame, directions: Mapping[str, int] = DIRECTIONS) -> pd.DataFrame:
    """Rank rows per metric column (1 = best), ties sharing the best rank ("min"), plus their mean.

    A column with no value at all gets no ranks (and stays out of the mean);
    a row missing one value in a ranked column gets that column's worst rank
    (as seed 003 does for a missing comparison). Rows with no value in any
    ranked column are not ranked at all: every rank is NaN.
    """
    cols = [c for c in directions if c in values.columns]
    ranks = pd.DataFrame(index=values.index)
    rankable = values[cols].notna().any(axis=1)
    sub = values.loc[rankable, cols].astype(float)
    for c in cols:
        col = sub[c]
        if col.isna().all():
            ranks[f"{c}_rank"] = np.nan
            continue
        r = col.rank(method="min", ascending=directions[c] < 0)
        r[col.isna()] = col.notna().sum() + 1  # a missing value ranks after every present one
        ranks[f"{c}_rank"] = r.reindex(values.index)
    ranks["avg_rank"] = ranks.mean(axis=1, skipna=True) if cols else np.nan
    return ranks


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than two values)."""
    a = np.asarray([x for x in xs if x is not None and not math.isnan(x)], dtype=float)
    if len(a) == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else math.nan


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's unequal-variance t-test of mean(a) != mean(b).

    NaN when either side has fewer than two values, or when both have zero
    variance (the test is undefined; equal constants give no evidence either way).
    """
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if a.var(ddof=1) == 0 and b.var(ddof=1) == 0:
        return math.nan
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


# Fewer confirmation seeds than this give no p-value: with n = 2 a t-test has one degree of freedom per
# side and its p-value says almost nothing (and reads as if it did).
MIN_SEEDS_FOR_TESTS = 3
ALPHA = 0.05


def mean_ci(xs: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided Student-t confidence interval of the mean (NaN for fewer than two values)."""
    from scipy import stats

    a = np.asarray([x for x in xs if x is not None and not math.isnan(x)], dtype=float)
    if len(a) < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a))
    return float(a.mean() - half), float(a.mean() + half)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control over many comparisons); NaN stays NaN.

    Sorted ascending, the i-th of m p-values (0-based) is multiplied by m - i,
    made non-decreasing along the order, and capped at 1.
    """
    p = np.asarray(pvalues, dtype=float)
    ok = np.flatnonzero(~np.isnan(p))
    out = np.full(len(p), np.nan)
    m = len(ok)
    running = 0.0
    for i, j in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return out.tolist()


def tied_with_best(samples: Mapping[str, Sequence[float]], alpha: float = ALPHA) -> tuple[str | None, dict[str, bool]]:
    """The method with the highest mean, and for each method whether it is not significantly below it.

    Each other method is compared with the best by Welch's t-test, the p-values
    Holm-corrected over those comparisons; a method whose corrected p-value is
    at least `alpha` (or that cannot be tested) shares the top group.
    """
    means = {k: float(np.mean(v)) for k, v in samples.items() if len(v)}
    if not means:
        return None, {}
    best = max(means, key=lambda k: (means[k], k))
    others = [k for k in means if k != best]
    adj = holm([welch_p(samples[k], samples[best]) for k in others])
    tied = {best: True, **{k: not (p < alpha) for k, p in zip(others, adj)}}
    return best, tied
