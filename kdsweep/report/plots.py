"""The report's figures as PNG files (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from kdsweep.methods.registry import METHODS
from kdsweep.study.best import best_trial

DPI = 120
# tab20's strong shades first, then its light ones: the first ten methods get ten distinct hues. With a marker
# from a cycle of another length beside each colour, 20+ methods stay distinguishable (and in greyscale).
COLORS = [plt.get_cmap("tab20")(i) for i in list(range(0, 20, 2)) + list(range(1, 20, 2))]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h"]


def method_styles(labels) -> dict[str, tuple[tuple, str]]:
    """(colour, marker) per label, the same in every plot and every report: a known method keeps its slot in the
    sorted list of methods; other labels (study files) take the next free slots, in sorted order."""
    known = sorted(METHODS)
    taken = {known.index(lbl) for lbl in labels if lbl in known}
    free = (i for i in range(len(known) + len(labels)) if i not in taken)
    slots = {lbl: known.index(lbl) if lbl in known else next(free) for lbl in sorted(set(labels))}
    return {lbl: (COLORS[i % len(COLORS)], MARKERS[(i + i // len(COLORS)) % len(MARKERS)]) for lbl, i in slots.items()}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _retitle(ax, text: str) -> None:
    """Replace Optuna's generic title (it uses the left or the centre slot) with ours."""
    for loc in ("left", "center", "right"):
        ax.set_title("", loc=loc)
    ax.set_title(text, fontsize=9)


def acc_bars(bars: pd.DataFrame, path: Path, title: str, reference: str | None = None) -> Path:
    """Test accuracy per method, one row each, best on top: a point at the mean, error bars of one sample std (with
    seeds); the teacher as a line. Rows, so 20 methods stay readable at any width; points, not bars: the axis does
    not start at zero, and a truncated bar would exaggerate the gaps."""
    teacher = bars[(bars["label"] == "teacher") & bars["acc"].notna()]
    rows = bars[(bars["label"] != "teacher") & bars["acc"].notna()].sort_values("acc", ascending=False).reset_index(drop=True)
    styles = method_styles(list(rows["label"]))
    fig, ax = plt.subplots(figsize=(7.5, 1.3 + 0.32 * max(len(rows), 2)))
    std = rows["acc_std"].to_numpy(dtype=float)
    for i, r in rows.iterrows():
        color, marker = styles[r["label"]]
        s = None if math.isnan(std[i]) else std[i]
        ax.errorbar([r["acc"]], [i], xerr=None if s is None else [[s], [s]], fmt=marker, color=color, capsize=4,
                    markersize=7, markeredgecolor="black" if r["label"] == reference else color)
        txt = f"{r['acc']:.3f}" + ("" if s is None else f" ± {s:.3f}") + f"  n={int(r['n'])}"
        ax.annotate(txt, (r["acc"] + (s or 0), i), ha="left", va="center", fontsize=7, xytext=(6, 0),
                    textcoords="offset points")
    values = list(rows["acc"] - np.nan_to_num(std)) + list(rows["acc"] + np.nan_to_num(std))
    if len(teacher):
        t = float(teacher["acc"].iloc[0])
        ax.axvline(t, color="#c44e52", linestyle="--", linewidth=1, label=f"teacher {t:.3f}")
        values.append(t)
        ax.legend(loc="best", fontsize=8)  # where no point is
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = 0.1 * (hi - lo) + 0.01
    ax.set_xlim(max(0.0, lo - pad), hi + 2.5 * pad)  # room on the right for the numbers
    ax.set_ylim(len(rows) - 0.5, -0.5)  # best on top
    ax.set_yticks(range(len(rows)), [f"{lbl} (reference)" if lbl == reference else lbl for lbl in rows["label"]],
                  fontsize=8)
    ax.set_xlabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def val_curves(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> Path:
    """Validation accuracy per epoch of each method's best trial."""
    styles = method_styles(list(curves))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label, pts in sorted(curves.items()):
        if pts:
            color, marker = styles[label]
            ax.plot([p[0] + 1 for p in pts], [p[1] for p in pts], marker=marker, markersize=4, color=color, label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if curves:  # beside the axes, not over the curves; two columns past 14 methods
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 if len(curves) <= 14 else 2)
    return _save(fig, path)


# Importances from fewer complete trials are noise: on 4 trials fANOVA and optuna-dashboard ranked the same study's
# parameters differently.
MIN_TRIALS_FOR_IMPORTANCE = 10


def optuna_plots(study, label: str, out: Path, say: Callable[[str], None]) -> list[Path]:
    """Optuna's optimisation history and parameter importances of one study (importances need 10+ complete trials)."""
    import optuna
    from optuna.visualization import matplotlib as ovm

    paths = []
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        say(f"note: {label}: no complete trial, no Optuna plots")
        return paths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
        ax = ovm.plot_optimization_history(study, target_name="validation accuracy")
        _retitle(ax, f"{label}: optimisation history ({len(complete)} complete trials)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        paths.append(_save(ax.figure, out / f"history_{_slug(label)}.png"))
        if len(complete) < MIN_TRIALS_FOR_IMPORTANCE or not best_trial(complete).params:
            say(f"note: {label}: no importance plot: fANOVA on {len(complete)} complete trials would be noise "
                f"(it needs {MIN_TRIALS_FOR_IMPORTANCE}+ and a searched parameter)")
            return paths
        try:
            ev = optuna.importance.FanovaImportanceEvaluator(seed=0)
            ax = ovm.plot_param_importances(study, evaluator=ev)
        except Exception as e:  # too few or too uniform trials
            plt.close("all")
            say(f"note: {label}: parameter importances not computed ({type(e).__name__}: {str(e)[:80]})")
            return paths
        _retitle(ax, f"{label}: hyperparameter importances (fANOVA, {len(complete)} complete trials)")
        paths.append(_save(ax.figure, out / f"importance_{_slug(label)}.png"))
    return paths


def cd_diagram(mean_ranks: dict[str, float], groups: list[list[str]], cd: float, path: Path, title: str) -> Path:
    """Demšar's critical-difference diagram: the methods on an axis of mean rank (1, the best, on the left), each
    named beside a line down from its rank, a thick bar joining each group not significantly different, the CD
    drawn as a scale above the axis."""
    order = sorted(mean_ranks, key=lambda m: (mean_ranks[m], m))
    k = len(order)
    lo, hi = 1, max(k, 2)
    half = (k + 1) // 2
    bottom = 0.6 + 0.55 * max(half - 1, 0) + 0.35 * len(groups) + 0.4
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.3 * (bottom + 2.2)))
    ax.set_xlim(lo - 2.6, hi + 2.6)
    ax.set_ylim(-bottom, 2.2)
    ax.axis("off")
    ax.hlines(0, lo, hi, color="black", lw=1)
    for r in range(lo, hi + 1):
        ax.vlines(r, 0, 0.15, color="black", lw=1)
        ax.text(r, 0.3, str(r), ha="center", va="bottom", fontsize=8)
    if cd == cd and cd > 0:  # NaN with too few blocks: no scale
        ax.hlines(1.3, lo, lo + cd, color="black", lw=1.5)
        ax.text(lo + cd / 2, 1.45, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=8)
    for i, m in enumerate(order):
        left = i < half
        y = -(0.6 + (i if left else k - 1 - i) * 0.55 + 0.35 * len(groups))
        x_text = lo - 0.2 if left else hi + 0.2
        ax.plot([mean_ranks[m], mean_ranks[m], x_text], [0, y, y], color="black", lw=0.8)
        ax.text(x_text, y, f"{m} ({mean_ranks[m]:.2f})" if left else f"({mean_ranks[m]:.2f}) {m}",
                ha="right" if left else "left", va="center", fontsize=8)
    for j, g in enumerate(groups):
        y = -(0.25 + 0.3 * j)
        ax.hlines(y, mean_ranks[g[0]] - 0.05, mean_ranks[g[-1]] + 0.05, color="tab:red", lw=3)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
