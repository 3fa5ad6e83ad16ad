"""Ranking methods over many blocks: average ranks, the Friedman test and the Nemenyi critical difference.

A block is one (dataset, teacher, student, teacher seed) whose methods were all confirmed; in each block
the methods are ranked by mean test accuracy (rank 1 = best, ties share the average of their ranks).
Demšar (JMLR 2006): the Friedman test asks whether the mean ranks differ more than chance allows; two
methods differ (Nemenyi, all pairs) when their mean ranks differ by at least the critical difference
CD = q_alpha * sqrt(k (k + 1) / (6 N)) for k methods over N blocks.
"""

from __future__ import annotations

import math

import numpy as np

from kdsweep.report.metrics import ALPHA


def block_ranks(scores: np.ndarray) -> np.ndarray:
    """Ranks within each row of an (N blocks, k methods) array of scores, higher score = rank 1; ties averaged."""
    from scipy.stats import rankdata

    return np.vstack([rankdata(-np.asarray(row, dtype=float), method="average") for row in np.atleast_2d(scores)])


def friedman(scores: np.ndarray) -> tuple[float, float]:
    """Friedman's chi-square statistic (corrected for ties) and its p-value, for an (N blocks, k methods) array.

    chi2 = [12 / (N k (k+1)) * sum_j R_j^2 - 3 N (k+1)] / C, R_j the rank sums, C = 1 - sum(t^3 - t) / (N k (k^2 - 1))
    over the groups of t tied scores in each block; chi-square with k - 1 degrees of freedom.
    """
    from scipy.stats import chi2

    ranks = block_ranks(scores)
    n, k = ranks.shape
    if n < 2 or k < 2:
        return math.nan, math.nan
    sums = ranks.sum(axis=0)
    ties = sum(float(t ** 3 - t) for row in ranks for t in np.unique(row, return_counts=True)[1])
    correction = 1.0 - ties / (n * k * (k * k - 1))
    if correction <= 0:  # every block a complete tie: no evidence either way
        return math.nan, math.nan
    stat = (12.0 / (n * k * (k + 1)) * float((sums ** 2).sum()) - 3.0 * n * (k + 1)) / correction
    return stat, float(chi2.sf(stat, k - 1))


def q_alpha(k: int, alpha: float = ALPHA) -> float:
    """Nemenyi's critical value: the studentized range's 1 - alpha quantile for k groups, infinite df, over sqrt 2."""
    from scipy.stats import studentized_range

    return float(studentized_range.ppf(1.0 - alpha, k, np.inf) / math.sqrt(2.0))


def critical_difference(k: int, n: int, alpha: float = ALPHA) -> float:
    """The Nemenyi critical difference of mean ranks for k methods over n blocks."""
    if k < 2 or n < 1:
        return math.nan
    return q_alpha(k, alpha) * math.sqrt(k * (k + 1) / (6.0 * n))


def cd_groups(mean_ranks: dict[str, float], cd: float) -> list[list[str]]:
    """The maximal runs of methods (in rank order) whose mean ranks all lie within less than `cd` of each other:
    the bars of a critical-difference diagram. A method alone in its run is in no group."""
    order = sorted(mean_ranks, key=lambda m: (mean_ranks[m], m))
    runs = []
    for i, first in enumerate(order):
        last = i
        while last + 1 < len(order) and mean_ranks[order[last + 1]] - mean_ranks[first] < cd:
            last += 1
        if last > i and not (runs and runs[-1][-1] == order[last]):  # contained in the previous run: not maximal
            runs.append(order[i:last + 1])
    return runs
