"""The report: which method wins for one dataset and teacher -> student pair, by how much, how surely.

The studies are read back from MLflow (stored_studies.py), and the Optuna studies for
the plots are rebuilt from the trial runs. Three tables are built with pandas:

  best     one row per study: its best trial (by validation accuracy, as
           Optuna picks it), that trial's test accuracy and hyperparameters
           (flagged when at the edge of the searched range), and what the
           study cost: trials by state, epochs and seconds over all trials,
           and its budget; the teacher on top;
  metrics  the best config of every method evaluated on the test split
           (see kdsweep.metrics), with the cost of teacher and student;
  ranks    the primary ranking by test accuracy - n, mean ± std, 95% CI,
           the difference to `ce`, Holm-corrected p-values against `ce`, and
           the group of methods not significantly below the best - beside seed
           003's table of ranks per metric and their average.

Once `kdsweep confirm` has retrained each best config with fresh seeds, the
metrics of a method are over those confirmation runs (the tuning trial itself
is left out: it was selected for being lucky on validation). p-values need at
least MIN_SEEDS_FOR_TESTS seeds per method; with fewer the table says why
there are none.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from kdsweep.common import atomic, failures
from kdsweep.common.errors import UserError
from kdsweep.common.space import edge_warnings
from kdsweep.common.uris import redact
from kdsweep.data.device_data import DeviceData
from kdsweep.report.confirm import confirm, lost_seeds
from kdsweep.report.metrics import (
    ALPHA,
    DIRECTIONS,
    MIN_SEEDS_FOR_TESTS,
    all_metrics,
    holm,
    mean_ci,
    mean_std,
    rank_table,
    tied_with_best,
    welch_p,
)
from kdsweep.report.stored_studies import (
    REFERENCE,
    Say,
    Selection,
    StudyRuns,
    confirm_seeds,
    data_key,
    download,
    load_teacher,
    open_tracker,
    select,
    split_data,
)
from kdsweep.study.best import ranked_runs
from kdsweep.tracking import cleanup
from kdsweep.tracking.vocabulary import (
    REASON_TAG,
    RUN_FAILED,
    RUN_KILLED,
    STATE_COMPLETE,
    STATE_FAIL,
    STATE_PRUNED,
    STATE_TAG,
)
from kdsweep.training import checkpoint

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per checkpoint would drown the report

FORMATS = ("md", "csv", "tex", "html", "json")
TABLES = ("best", "metrics", "ranking", "ranks")
METRIC_COLS = list(DIRECTIONS)


@torch.no_grad()
def predict(model: torch.nn.Module, data: DeviceData, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits and labels of a whole split, on the CPU."""
    model.to(data.device).eval()
    logits, labels = [], []
    for x, y in data.eval_batches(split):
        logits.append(model(x).float().cpu())
        labels.append(y.cpu())
    return torch.cat(logits), torch.cat(labels)


# ---------------------------------------------------------------- building the tables


@dataclass
class Evaluated:
    """Per-run metrics of one study: one dict per evaluated checkpoint."""

    study: StudyRuns
    runs: list[dict[str, float]]
    source: str  # "best trial" or "N confirmation seeds"

    def values(self, metric: str) -> list[float]:
        return [r[metric] for r in self.runs]

    @property
    def confirmed(self) -> bool:
        return self.source.endswith("confirmation seeds")


@dataclass
class Teacher:
    """The studies' teacher as the report sees it (every field empty when its checkpoint is missing)."""

    model: torch.nn.Module | None = None
    metrics: dict | None = None
    meta: dict | None = None
    logits: dict | None = None  # data key -> teacher logits on that split's test set


@dataclass
class Report:
    sel: Selection
    tables: dict[str, pd.DataFrame]  # numeric, for csv/json
    display: dict[str, pd.DataFrame]  # formatted strings, for md/tex/html and the terminal
    warnings: list[str]  # shown above the tables: what makes the comparison unfair
    notes: list[str]
    curves: dict[str, list[tuple[int, float]]]  # label -> best trial's val_acc per epoch
    bars: pd.DataFrame  # label, acc mean, acc std, n (+ teacher)
    tmp: Path
    captions: dict[str, str] = field(default_factory=dict)  # table name -> the one line that reads it, beside it


def _fmt_params(run, names: list[str], fixed: list[str]) -> str:
    p = run.data.params
    parts = [f"{k}={float(p[k]):.4g}" for k in sorted(names) if k in p]
    parts += [f"{k}={float(p[k]):.4g} (fixed)" for k in sorted(fixed) if k in p]
    return ", ".join(parts)


def _runs_to_evaluate(s: StudyRuns, study_seed: int, seeds: int | None) -> tuple[list, str]:
    """The confirmation runs of the study's best config (one per seed, the latest), else its best trial."""
    runs = s.confirms
    if seeds is not None:
        keep = set(map(str, confirm_seeds(study_seed, seeds)))
        runs = [r for r in runs if r.data.tags.get("kdsweep.confirm_seed") in keep]
    by_seed = {}
    for r in sorted(runs, key=lambda r: r.info.start_time):
        by_seed[r.data.tags.get("kdsweep.confirm_seed")] = r
    if by_seed:
        return list(by_seed.values()), f"{len(by_seed)} confirmation seeds"
    return [s.best], "best trial"


# ---------------------------------------------------------------- evaluating checkpoints


class _Splits:
    """Each study is evaluated on the split it trained on (normally one split shared by all); built once each."""

    def __init__(self, data_dir: str | None, device: torch.device):
        self.data_dir, self.device, self.cache = data_dir, device, {}

    def __call__(self, params) -> DeviceData:
        k = data_key(params)
        if k not in self.cache:
            self.cache[k] = split_data(params, self.data_dir, self.device)
        return self.cache[k]


def _evaluate_teacher(sel: Selection, data: DeviceData, key: tuple, tmp: Path, say: Say, notes: list[str]) -> Teacher:
    model, payload, t_where = load_teacher(sel, tmp, say, data.in_shape, data.num_classes)
    if model is None:
        notes.append(f"teacher missing: {t_where}; teacher-comparison metrics are empty")
        say(f"note: teacher missing: {t_where}")
        return Teacher()
    logits, labels = predict(model, data)
    return Teacher(model, all_metrics(logits, labels), payload.get("meta", {}), {key: logits})


def _evaluate_study(s: StudyRuns, sel: Selection, splits: _Splits, teacher: Teacher, tmp: Path, seeds: int | None,
                    say: Say) -> Evaluated:
    if s.best is None:
        return Evaluated(s, [], "no complete trial")
    d, k = splits(s.params), data_key(s.params)
    if teacher.model is not None and k not in teacher.logits:
        teacher.logits[k] = predict(teacher.model, d)[0]
    t_logits = teacher.logits.get(k) if teacher.logits else None
    runs, source = _runs_to_evaluate(s, sel.seed, seeds)
    if source == "best trial":  # a lost checkpoint must not drop the method: the next best trial that has one
        runs = ranked_runs(s.trials)
    out = []
    for r in runs:
        path = download(sel.tracker, r.info.run_id, "checkpoint/student.pt", tmp)
        if path is None:
            if source != "best trial":
                say(f"note: {s.label}: run {r.info.run_id} has no checkpoint/student.pt artifact; skipped")
            continue
        if r is not s.best and source == "best trial":
            say(f"note: {s.label}: best trial {s.best.data.tags.get('kdsweep.trial')} has no checkpoint/student.pt "
                f"artifact; evaluating trial {r.data.tags.get('kdsweep.trial')}, the best trial that has one")
        model, _ = checkpoint.load_model(path, sel.student, d.in_shape, d.num_classes)
        logits, labels = predict(model, d)
        out.append(all_metrics(logits, labels, t_logits))
        if source == "best trial":
            break
    return Evaluated(s, out, source if out else "checkpoint missing")


def _cost(sel: Selection, teacher: Teacher, data: DeviceData, device: torch.device, latency: bool) -> dict[str, dict]:
    """Parameters, MACs and latency: one measurement per architecture."""
    from kdsweep.models.cost import count_macs, count_params, latency_ms
    from kdsweep.models.factory import build_model

    cost = {}
    for role, arch, model in (("teacher", sel.teacher, teacher.model), ("student", sel.student, None)):
        m = (model if model is not None else build_model(arch, data.in_shape, data.num_classes)).to(device)
        cost[role] = {"params": count_params(m), "macs": count_macs(m, data.in_shape),
                      "latency_ms": latency_ms(m, data.in_shape, device) if latency else math.nan}
    return cost


# ---------------------------------------------------------------- the tables


def _running(sel: Selection) -> list[str]:
    """The studies that were still running (a RUNNING parent or trial run in MLflow) when the report was made."""
    return [s.label for s in sel.studies
            if s.run.info.status == "RUNNING" or any(r.info.status == "RUNNING" for r in s.trials)]


def _budget_warnings(sel: Selection) -> list[str]:
    """What makes the studies' compute unequal, in words for the top of the report."""
    studies = [s for s in sel.studies if s.trials]
    out = []
    running = _running(sel)
    if running:
        out.append(f"in progress: {', '.join(running)} still running when this report was made (or its worker died "
                   f"without closing its runs: `kdsweep status` tells); the tables are a snapshot, not the result")
    budgets = {s.label: s.budget or "unrecorded" for s in studies}
    if len(set(budgets.values())) > 1:
        out.append("the methods ran with different budgets (" + ", ".join(f"{k}: {v}" for k, v in sorted(budgets.items()))
                   + "): the comparison is not like for like; `kdsweep sweep --budget-epochs E` gives every method the same")
    epochs = {s.label: s.epochs_trained() for s in studies}
    # One trial's epochs, from the per-trial settings every study has (e30-b100 -> 30): a budget in epochs ends
    # up to one trial past its mark, so smaller differences are expected and not worth a warning.
    per_trial = max((int(re.match(r"e(\d+)", s.per_trial).group(1)) for s in studies if re.match(r"e\d+", s.per_trial)),
                    default=1)
    if not out and epochs and max(epochs.values()) - min(epochs.values()) > per_trial:
        out.append("the methods trained for different numbers of epochs (" + ", ".join(f"{k}: {v}" for k, v in sorted(epochs.items()))
                   + "), as a budget counted in trials allows when some methods prune more; --budget-epochs gives equal compute")
    per = {s.per_trial for s in studies}
    if len(per) > 1:
        out.append(f"the studies' trials compute different things ({', '.join(sorted(per))}): not like for like")
    return out


def _best_table(sel: Selection, evaluated: list[Evaluated], teacher: Teacher, ref: StudyRuns | None) -> pd.DataFrame:
    meta = teacher.meta or {}
    rows = [{"label": "teacher", "method": "teacher", "study": "", "best_trial": np.nan,
             "best_val_acc": meta.get("val_acc", np.nan), "test_acc": teacher.metrics["acc"] if teacher.metrics else np.nan,
             "params": f"{sel.teacher}, {meta.get('epochs', '?')} epochs" if teacher.metrics else sel.teacher,
             "at_range_edge": "", "complete": np.nan, "pruned": np.nan, "failed": np.nan, "epochs_all": np.nan,
             "train_seconds_best": np.nan, "train_seconds_all": np.nan, "budget": "", "per_trial": "",
             "status": "reference" if teacher.metrics else "teacher checkpoint missing"}]
    for e in evaluated:
        s, b = e.study, e.study.best
        edges = edge_warnings(s.best_params(), s.space()) if b else []
        rows.append({
            "label": s.label, "method": s.method, "study": s.name,
            "best_trial": int(b.data.tags.get("kdsweep.trial", -1)) if b else np.nan,
            "best_val_acc": b.data.metrics.get("best_val_acc", np.nan) if b else np.nan,
            "test_acc": b.data.metrics.get("test_acc", np.nan) if b else np.nan,
            "params": _fmt_params(b, s.searched(), s.fixed()) if b else "",
            "at_range_edge": "; ".join(edges), **s.counts(), "epochs_all": s.epochs_trained(),
            "train_seconds_best": b.data.metrics.get("train_seconds", np.nan) if b else np.nan,
            "train_seconds_all": s.train_seconds(), "budget": s.budget, "per_trial": s.per_trial,
            "status": ("reference" if s is ref else "ok") if b else "no complete trial",
        })
    best = pd.DataFrame(rows)
    return best.astype({k: "Int64" for k in ("best_trial", "complete", "pruned", "failed", "epochs_all")})


def _metrics_table(evaluated: list[Evaluated], teacher: Teacher, cost: dict) -> pd.DataFrame:
    t_metrics = teacher.metrics or {k: np.nan for k in METRIC_COLS}
    rows = [{"label": "teacher", "method": "teacher", "n": 1 if teacher.metrics else 0,
             "source": "teacher checkpoint" if teacher.metrics else "missing", **t_metrics,
             **{f"{k}_std": np.nan for k in METRIC_COLS}, **cost["teacher"]}]
    for e in evaluated:
        row = {"label": e.study.label, "method": e.study.method, "n": len(e.runs), "source": e.source}
        for k in METRIC_COLS:
            row[k], row[f"{k}_std"] = mean_std(e.values(k)) if e.runs else (np.nan, np.nan)
        rows.append({**row, **cost["student"]})
    met = pd.DataFrame(rows)
    # Order: teacher first, then by (mean) test accuracy, methods without data last.
    order = met.assign(_t=met["label"] != "teacher", _a=-met["acc"].fillna(-np.inf)).sort_values(["_t", "_a", "label"]).index
    return met.loc[order].reset_index(drop=True)


def _ranking_table(students: pd.DataFrame, evaluated: list[Evaluated], ref: StudyRuns | None
                   ) -> tuple[pd.DataFrame, list[str], str]:
    """The primary ranking, by test accuracy: CI, difference and Holm-corrected p-value against ce, the top group."""
    by_label = {e.study.label: e for e in evaluated}
    accs = {lbl: by_label[lbl].values("acc") for lbl in students["label"]}
    testable = {lbl for lbl in accs if by_label[lbl].confirmed and len(accs[lbl]) >= MIN_SEEDS_FOR_TESTS}
    ref_acc = accs.get(ref.label, []) if ref is not None else []
    out = students[["label", "method", "n", "acc", "acc_std"]].copy()
    cis = [mean_ci(accs[lbl]) if by_label[lbl].confirmed else (np.nan, np.nan) for lbl in out["label"]]
    out["ci95_low"], out["ci95_high"] = [c[0] for c in cis], [c[1] for c in cis]
    out["delta_acc_vs_ce"] = out["acc"] - (np.mean(ref_acc) if ref_acc else np.nan)
    compared = [lbl for lbl in out["label"] if ref is not None and lbl != ref.label and lbl in testable and ref.label in testable]
    raw = {lbl: welch_p(accs[lbl], ref_acc) for lbl in compared}
    adj = dict(zip(compared, holm([raw[lbl] for lbl in compared])))
    out["p_vs_ce"] = [raw.get(lbl, np.nan) for lbl in out["label"]]
    out["p_vs_ce_holm"] = [adj.get(lbl, np.nan) for lbl in out["label"]]
    best, tied = tied_with_best({lbl: accs[lbl] for lbl in testable})
    out["top_group"] = [(bool(tied[lbl]) if lbl in tied else pd.NA) for lbl in out["label"]]
    out["top_group"] = out["top_group"].astype("boolean")

    notes = []
    ns = sorted({len(accs[lbl]) for lbl in accs if by_label[lbl].confirmed})
    caption = (f"top group: a method not significantly below the best mean ({best}): Welch's t-test of its test "
               f"accuracy against {best}'s over {'/'.join(map(str, ns))} seeds, Holm-corrected over the "
               f"{len(tied) - 1} comparisons, corrected p ≥ {ALPHA}; – where a method has fewer than "
               f"{MIN_SEEDS_FOR_TESTS} confirmation seeds" if len(testable) >= 2 else
               f"top group and p-values: – until every method has {MIN_SEEDS_FOR_TESTS} or more confirmation seeds "
               f"(kdsweep confirm --seeds 5)")
    if not ns:
        notes.append("one run per method (its best trial, selected on validation): no CI and no p-values; run "
                     "`kdsweep confirm --seeds 5` for mean ± std, 95% CIs and tests")
    elif len(testable) < 2:
        notes.append(f"no p-values: they need at least {MIN_SEEDS_FOR_TESTS} confirmation seeds per method "
                     f"(here {'/'.join(map(str, ns))}); a t-test on fewer says almost nothing; run `kdsweep confirm --seeds 5`")
    else:
        notes.append(f"p_vs_ce: two-sided Welch t-test of test accuracy against {REFERENCE}, Holm-corrected over the "
                     f"{len(compared)} comparisons (p_vs_ce_holm; raw p in the CSV); top group: the best mean ({best}) and "
                     f"every method not significantly below it (Welch vs the best, Holm, alpha={ALPHA}); CI: 95% Student t")
        short = sorted(set(accs) - testable)
        if short:
            notes.append(f"not tested (fewer than {MIN_SEEDS_FOR_TESTS} confirmation seeds): {', '.join(short)}")
    return out, notes, caption


def _ranks_table(students: pd.DataFrame) -> pd.DataFrame:
    """Seed 003's table: a rank per metric (its directions) and the average rank."""
    return pd.concat([students[["label", "method", "n"]], rank_table(students[METRIC_COLS])], axis=1)


def build(sel: Selection, data_dir: str | None = None, device: torch.device | str = "cpu", seeds: int | None = None,
          say: Say = print, latency: bool = True, tmp: Path | None = None) -> Report:
    """Evaluate the selection's best configs and build the tables (downloads go to `tmp`)."""
    device = torch.device(device)
    if not sel.studies:
        raise UserError("no studies selected")
    tmp = tmp or Path(tempfile.mkdtemp(prefix="kdsweep-report-"))
    notes = list(sel.notes)
    keys = Counter(data_key(s.params) for s in sel.studies)
    if len(keys) > 1:
        notes.append(f"the studies used {len(keys)} different data settings (data_size/val_fraction); "
                     f"each is evaluated on its own split, the teacher row on the most common one")
    splits = _Splits(data_dir, device)
    main_key = keys.most_common(1)[0][0]
    data = splits(next(s.params for s in sel.studies if data_key(s.params) == main_key))

    teacher = _evaluate_teacher(sel, data, main_key, tmp, say, notes)
    evaluated = [_evaluate_study(s, sel, splits, teacher, tmp, seeds, say) for s in sel.studies]
    cost = _cost(sel, teacher, data, device, latency)
    if latency:
        notes.append(f"ms/image: median of 10 batches of 128 on {device.type}"
                     + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
                     + ", measured now on this machine (noisy when it is busy)")
    ref = sel.reference
    if ref is None:
        notes.append(f"no {REFERENCE!r} study: differences to the baseline are not computed")

    met = _metrics_table(evaluated, teacher, cost)
    best = _best_table(sel, evaluated, teacher, ref).set_index("label").loc[met["label"]].reset_index()
    students = met[met["label"] != "teacher"].reset_index(drop=True)
    ranking, stat_notes, rule = _ranking_table(students, evaluated, ref)
    notes += stat_notes
    for e in evaluated:
        if not e.runs:
            notes.append(f"{e.study.label}: {e.source}")
    for _, row in best[best["at_range_edge"] != ""].iterrows():
        notes.append(f"{row['label']}: {row['at_range_edge']}")

    curves = {}
    for s in sel.studies:
        if s.best is not None:
            hist = sel.tracker.client.get_metric_history(s.best.info.run_id, "val_acc")
            curves[s.label] = sorted((m.step, m.value) for m in hist)
    tables = {"best": best, "metrics": met, "ranking": ranking, "ranks": _ranks_table(students)}
    display = {"best": _display_best(best), "metrics": _display_metrics(met), "ranking": _display_ranking(ranking),
               "ranks": _display_ranks(tables["ranks"])}
    captions = {"ranking": rule, **({"best": GROUPED_COST} if trained_in_groups(sel.studies) else {})}
    return Report(sel, tables, display, _budget_warnings(sel), notes, curves, met[["label", "acc", "acc_std", "n"]].copy(), tmp,
                  captions)


GROUPED_COST = ("train s (all): the trials' training wall time, summed. A trial trained in a lockstep group (--parallel "
                "above 1) is charged its whole group's time, so where methods shared groups this column follows the "
                "grouping, not each method's own cost; epochs (all) compares what the studies trained")


def trained_in_groups(studies) -> bool:
    """Whether any study trained its trials in lockstep groups (its parent run's `parallel` above 1)."""
    sizes = (str(s.params.get("parallel", "1")) for s in studies)  # older stores logged none: trained alone
    return any(k.isdigit() and int(k) > 1 for k in sizes)


# ---------------------------------------------------------------- formatting


def _missing(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, (float, np.floating)) and math.isnan(v))


def _num(v, digits: int = 4) -> str:
    if _missing(v):
        return "–"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{v:.{digits}f}"


def _pm(mean, std, digits: int = 4) -> str:
    if _missing(mean):
        return "–"
    return _num(mean, digits) if _missing(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _int(v) -> str:
    return "–" if _missing(v) else str(int(v))


def _display_best(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "method": df["label"], "best val acc": df["best_val_acc"].map(_num), "test acc": df["test_acc"].map(_num),
        "params": [p + (" ⚠ edge: " + ", ".join(w.split("=")[0] for w in e.split("; ")) if e else "")
                   for p, e in zip(df["params"], df["at_range_edge"])],
        "trial": df["best_trial"].map(_int), "complete": df["complete"].map(_int),
        "pruned": df["pruned"].map(_int), "failed": df["failed"].map(_int), "epochs (all)": df["epochs_all"].map(_int),
        "train s (all)": df["train_seconds_all"].map(lambda v: _num(v, 1)), "budget": df["budget"],
        "status": df["status"],
    })


def _display_metrics(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"method": df["label"], "n": df["n"].map(_int)})
    for k in METRIC_COLS:
        out[k] = [_pm(m, s) for m, s in zip(df[k], df[f"{k}_std"])]
    out["params"] = df["params"].map(lambda v: f"{int(v):,}")
    out["MACs"] = df["macs"].map(lambda v: f"{int(v):,}")
    out["ms/image"] = df["latency_ms"].map(lambda v: _num(v, 4))
    return out


def _display_ranking(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "rank": range(1, len(df) + 1), "method": df["label"], "n": df["n"].map(_int),
        "test acc": [_pm(m, s) for m, s in zip(df["acc"], df["acc_std"])],
        "95% CI": ["–" if _missing(lo) else f"[{lo:.4f}, {hi:.4f}]" for lo, hi in zip(df["ci95_low"], df["ci95_high"])],
        "Δ vs ce": df["delta_acc_vs_ce"].map(lambda v: "–" if _missing(v) else f"{v:+.4f}"),
        "p vs ce (Holm)": df["p_vs_ce_holm"].map(lambda v: "–" if _missing(v) else f"{v:.3g}"),
        "top group": df["top_group"].map(lambda v: "–" if _missing(v) else ("yes" if v else "no")),
    })


def _display_ranks(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"method": df["label"], "n": df["n"].map(_int)})
    for k in METRIC_COLS:
        out[k] = df[f"{k}_rank"].map(_int)
    out["avg rank"] = df["avg_rank"].map(lambda v: _num(v, 2))
    return out


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table; numeric-looking columns right-aligned."""
    cells = [[str(c).replace("|", "\\|") for c in row] for row in df.astype(str).itertuples(index=False)]
    head = [str(c).replace("|", "\\|") for c in df.columns]
    numeric = re.compile(r"^[-+–]?[\d.,]+( ± [\d.]+)?$|^–$")
    right = [all(numeric.match(r[i]) for r in cells) and bool(cells) for i in range(len(head))]
    widths = [max([len(head[i])] + [len(r[i]) for r in cells]) for i in range(len(head))]

    def line(vals):
        return "| " + " | ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(vals, widths, right)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in cells])


TITLES = {"best": "Best trial per method, and what each study cost", "metrics": "Test metrics of the best config",
          "ranking": "Ranking by test accuracy", "ranks": "Ranks per metric (seed 003's table)"}


def method_lines(studies) -> list[str]:
    """Which form of each method ran (paper or seed notebook) and its reference (issue 14)."""
    from kdsweep.methods.registry import describe

    return ["## Methods", ""] + [f"- {x.label}: {describe(x.method)}" for x in studies] + [""]


def directions_text() -> str:
    return ("Directions: " + ", ".join(f"{k} {'higher' if d > 0 else 'lower'} is better" for k, d in DIRECTIONS.items())
            + "; ECE over 10 bins; KL is KL(teacher || student) in nats; ranks among the students (1 = best, "
            "ties share the best rank).")


def write_html(rep: Report, out: Path, plots: list[Path]) -> Path:
    """report.html: the whole report on one self-contained page, plots embedded (page.py)."""
    from kdsweep.report.page import render

    methods = [line[2:] for line in method_lines(rep.sel.studies) if line.startswith("- ")]
    path = out / "report.html"
    path.write_text(render(rep, plots, {n: TITLES[n] for n in TABLES}, methods, directions_text()), encoding="utf-8")
    return path


def to_markdown(rep: Report) -> str:
    s = rep.sel
    lines = [f"# kdsweep report: {s.dataset}, {s.teacher} -> {s.student}, seed {s.seed}", "",
             f"MLflow experiment `{s.experiment}` at {redact(s.tracker.uri)}", ""]
    lines += [f"**Warning:** {w}" for w in rep.warnings] + ([""] if rep.warnings else [])
    for name in TABLES:
        lines += [f"## {TITLES[name]}", ""] + ([f"*{rep.captions[name]}*", ""] if name in rep.captions else [])
        lines += [markdown_table(rep.display[name]), ""]
    lines += method_lines(s.studies)
    lines += [directions_text(), ""]
    lines += [f"- {n}" for n in rep.notes]
    return "\n".join(lines).rstrip() + "\n"


def export(rep: Report, formats: list[str], out: Path) -> list[Path]:
    """Write every table in every asked format into `out`; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        for name in TABLES:
            num, disp = rep.tables[name], rep.display[name]
            path = out / f"{name}.{fmt}"
            if fmt == "csv":
                num.to_csv(path, index=False)
            elif fmt == "json":
                path.write_text(num.to_json(orient="records", indent=2))
            elif fmt == "md":
                path.write_text(f"## {TITLES[name]}\n\n{markdown_table(disp)}\n")
            elif fmt == "tex":
                path.write_text(disp.to_latex(index=False, escape=True).replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("–", "--"))
            elif fmt == "html":
                path.write_text(disp.to_html(index=False, escape=True, border=0))
            written.append(path)
        if fmt == "md":
            p = out / "report.md"
            p.write_text(to_markdown(rep))
            written.append(p)
    return written


def parse_formats(text: str) -> list[str]:
    fmts = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise UserError(f"unknown format {', '.join(bad) or repr(text)}; choose from {','.join(FORMATS)}")
    return list(dict.fromkeys(fmts))


# ---------------------------------------------------------------- Optuna studies rebuilt from MLflow


def optuna_study(s: StudyRuns):
    """An in-memory Optuna study holding the study's trials as MLflow recorded them (for Optuna's plots)."""
    import optuna
    from optuna.distributions import FloatDistribution

    space = s.space()
    dists = {}
    for k in s.searched():
        if k in space:
            dists[k] = FloatDistribution(space[k].low, space[k].high, log=space[k].log)
        else:  # an unreadable range: the observed one
            vals = [float(r.data.params[k]) for r in s.trials if k in r.data.params]
            dists[k] = FloatDistribution(min(vals), max(vals)) if vals else None
    dists = {k: v for k, v in dists.items() if v is not None}
    study = optuna.create_study(direction="maximize", study_name=s.name)
    states = {STATE_COMPLETE: optuna.trial.TrialState.COMPLETE, STATE_PRUNED: optuna.trial.TrialState.PRUNED,
              STATE_FAIL: optuna.trial.TrialState.FAIL}
    for r in sorted(s.trials, key=lambda r: int(r.data.tags.get("kdsweep.trial", 0))):
        state = states.get(r.data.tags.get(STATE_TAG, ""))
        params = {k: float(r.data.params[k]) for k in dists if k in r.data.params}
        if state is None or len(params) != len(dists):
            continue
        value = r.data.metrics.get("best_val_acc") if state == optuna.trial.TrialState.COMPLETE else None
        if state == optuna.trial.TrialState.COMPLETE and value is None:
            continue
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value, state=state))
    return study


# ---------------------------------------------------------------- the whole command


def log_report(rep: Report, files: list[Path]) -> str:
    """An MLflow run (kdsweep.role=report) in the pair's experiment holding the exported files and plots."""
    s = rep.sel
    t = s.tracker
    running = _running(s)
    run = t.start(s.experiment_id, f"report-s{s.seed}" + ("-in-progress" if running else ""),
                  {"kdsweep.role": "report", "kdsweep.dataset": s.dataset, "kdsweep.in_progress": str(bool(running)).lower(),
                   **cleanup.owner_tags()})
    try:
        t.log(run, params={"dataset": s.dataset, "teacher": s.teacher, "student": s.student, "seed": s.seed,
                           "studies": ",".join(x.label for x in s.studies)})
        for f in files:
            t.client.log_artifact(run, str(f), "report/plots" if f.suffix == ".png" else "report")
    except BaseException as e:
        with contextlib.suppress(Exception):  # best effort: else the next report closes it (its owner is gone)
            t.close(run, RUN_KILLED if isinstance(e, KeyboardInterrupt) else RUN_FAILED,
                    {REASON_TAG: "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {str(e)[:200]}"})
        raise
    t.end(run)
    return run


# The files a report writes: what a marker from before markers listed their files can vouch for.
_REPORT_FILE = re.compile(r"^((best|metrics|ranking|ranks)\.(md|csv|tex|html|json)|report\.(md|html)|plots/[\w.-]+\.png)$")


def run_report(tracking_uri: str | None = None, dataset: str | None = None, teacher: str | None = None,
               student: str | None = None, seed: int | None = None, studies: list[str] | None = None,
               formats: str | None = None, out: str | None = None, seeds: int | None = None, device: str = "auto",
               data_dir: str | None = None, plots: bool = True, log: bool = True, say: Say = print, per_trial: str | None = None,
               show: Callable[[str], None] = print, overwrite: bool = False) -> Report:
    """`kdsweep report`: select, (confirm), evaluate, print markdown, export, plot, log.

    `out` is replaced as a whole when it holds only an earlier report; one holding other files is refused
    unless `overwrite`, which writes the report's files among them and removes nothing.
    """
    from kdsweep.training.devices import resolve_device

    fmts = parse_formats(formats) if formats else []
    if fmts and not out:
        raise UserError("--format needs --out DIR (without it the report is printed as markdown)")
    if out:
        atomic.check_out(Path(out), _REPORT_FILE.match, overwrite)
    dev = resolve_device(device)
    sel = _selection(open_tracker(tracking_uri), (dataset, teacher, student, seed, studies, per_trial), seeds, dev,
                     data_dir, log, say)
    with atomic.tmp_dir("kdsweep-report") as tmp:
        rep = build(sel, data_dir, dev, seeds, say, tmp=tmp)
        show(to_markdown(rep))
        with (atomic.atomic_dir(Path(out), _REPORT_FILE.match, overwrite) if out else contextlib.nullcontext(tmp / "out")) as out_dir:
            files = _write(rep, fmts or ["md"], out_dir, plots, say)
        if out:  # renamed into place: the files are now under `out`
            files = [Path(out) / f.relative_to(out_dir) for f in files]
            say(f"wrote {len(files)} files to {out}")
        if log:
            try:
                run = log_report(rep, files)
            except Exception as e:
                why = failures.explain(e)
                if why is None:
                    raise
                raise UserError(f"{why}; `--no-log` reports without writing to MLflow") from None
            say(f"logged to MLflow run {run} (experiment {sel.experiment!r}, artifacts under report/)")
    return rep


def _selection(tracker, choice: tuple, seeds: int | None, dev: torch.device, data_dir: str | None, log: bool,
               say: Say) -> Selection:
    """The studies to report, after the runs of dead reports are closed and, with `seeds`, the studies confirmed;
    without `seeds`, a confirmation seed whose process died is named in the notes (and its run closed, if `log`)."""
    sel = select(tracker, *choice)
    if log:
        _check_writable(tracker)
    if log or seeds is not None:  # --no-log writes nothing to MLflow (the store may be read-only)
        cleanup.close_dead_runs(tracker, sel.experiment_id, ("report",), say)
    if seeds is None:
        sel.notes += lost_seeds(sel, close=log)
        return sel
    confirm(sel, seeds, dev, data_dir, say)  # closes the lost seeds' runs and trains them again
    notes = sel.notes  # pick up the new runs, from the same studies
    sel = select(tracker, sel.dataset, sel.teacher, sel.student, sel.seed, [x.name for x in sel.studies])
    sel.notes = notes
    return sel


def _check_writable(tracker) -> None:
    """A report that will be logged fails now, not after evaluating every checkpoint, if its store is read-only."""
    if tracker.uri.startswith("sqlite:///"):
        db = Path(tracker.uri[len("sqlite:///"):].split("?", 1)[0])
        for p in (db, db.parent):
            if not os.access(p, os.W_OK):
                raise UserError(f"permission problem: the MLflow store {db} cannot be written ({p} is read-only for this "
                                f"user); `--no-log` reports without writing to MLflow")


def _write(rep: Report, fmts: list[str], out_dir: Path, plots: bool, say: Say) -> list[Path]:
    """The tables in every format, and the plots, into `out_dir`."""
    sel = rep.sel
    files = export(rep, fmts, out_dir)
    if plots:
        from kdsweep.report import plots

        pdir = out_dir / "plots"
        title = f"{sel.dataset}: {sel.teacher} -> {sel.student}, seed {sel.seed}"
        ref = sel.reference.label if sel.reference else None
        files.append(plots.acc_bars(rep.bars, pdir / "test_acc.png", title, ref))
        files.append(plots.val_curves(rep.curves, pdir / "val_curves.png", f"best trial per method - {title}"))
        for s in sel.studies:
            files += plots.optuna_plots(optuna_study(s), s.label, pdir, say)
    if "html" in fmts:  # one page with everything, after the plots it embeds
        files.append(write_html(rep, out_dir, [f for f in files if f.suffix == ".png"]))
    return files
