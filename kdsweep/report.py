"""The report: which method wins for one dataset and teacher -> student pair, by how much, how surely.

MLflow is the source of truth: the studies, their trials and checkpoints are
read back through the tracking client only (so a remote tracking server works
as well as the local SQLite store), and the Optuna studies for the plots are
rebuilt from the trial runs. Three tables are built with pandas:

  best     one row per study: its best trial (by validation accuracy, as
           Optuna picks it), that trial's test accuracy and hyperparameters,
           the trial counts and training time; the teacher on top;
  metrics  the best checkpoint of every method evaluated on the test split
           (see kdsweep.metrics), with the cost of teacher and student;
  ranks    rank per metric (directions in kdsweep.metrics.DIRECTIONS), the
           average rank and the difference in test accuracy to `ce`.

Once `kdsweep confirm` has retrained each best config with fresh seeds, the
metrics of a method are the mean and sample standard deviation over those
confirmation runs (the tuning trial itself is left out: it was selected for
being lucky on validation), and p-values compare each method's test
accuracies with ce's by Welch's unequal-variance t-test, two-sided.
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
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from . import checkpoint, failures, leftovers
from .data import DeviceData, get_dataset, load_data
from .errors import UserError
from .metrics import DIRECTIONS, all_metrics, mean_std, rank_table, welch_p
from .tracking import Tracker, redact

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per checkpoint would drown the report

REFERENCE = "ce"  # the baseline every method is compared with; the only method named here
TEACHERS_EXPERIMENT = "teachers"
FORMATS = ("md", "csv", "tex", "html", "json")
TABLES = ("best", "metrics", "ranks")
METRIC_COLS = list(DIRECTIONS)
Say = Callable[[str], None]


# ---------------------------------------------------------------- reading MLflow


@dataclass
class StudyRuns:
    """One study as MLflow holds it: the parent run, its trial runs, its confirmation runs."""

    run: Any  # mlflow Run of the study (kdsweep.role=study)
    trials: list
    confirms: list  # COMPLETE confirmation runs of the current best config
    best: Any | None = None  # the best COMPLETE trial run

    @property
    def name(self) -> str:
        return self.run.data.tags["kdsweep.study"]

    @property
    def method(self) -> str:
        return self.run.data.tags.get("kdsweep.method") or self.run.data.params.get("method", "?")

    @property
    def params(self) -> dict[str, str]:
        return self.run.data.params

    @property
    def label(self) -> str:
        """The study's name without the shared '-dataset-teacher-student-sSEED' suffix."""
        p = self.params
        suffix = f"-{p.get('dataset')}-{p.get('teacher')}-{p.get('student')}-s{p.get('seed')}"
        return self.name[: -len(suffix)] if self.name.endswith(suffix) and len(self.name) > len(suffix) else self.name

    def counts(self) -> dict[str, int]:
        c = Counter(r.data.tags.get("kdsweep.state", "") for r in self.trials)
        return {"complete": c["COMPLETE"], "pruned": c["PRUNED"], "failed": c["FAIL"]}

    def searched(self) -> list[str]:
        return [k[len("space."):] for k in self.params if k.startswith("space.")]

    def fixed(self) -> list[str]:
        return [k[len("fixed."):] for k in self.params if k.startswith("fixed.")]


@dataclass
class Selection:
    tracker: Tracker
    experiment_id: str
    experiment: str
    dataset: str
    teacher: str
    student: str
    seed: int
    studies: list[StudyRuns] = field(default_factory=list)

    @property
    def reference(self) -> StudyRuns | None:
        refs = [s for s in self.studies if s.method == REFERENCE]
        return next((s for s in refs if s.label == REFERENCE), refs[0] if refs else None)


def search_all(client, experiment_id: str, flt: str = "") -> list:
    """Every active run of an experiment matching `flt`, page by page."""
    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=flt, max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def open_tracker(uri: str | None) -> Tracker:
    """The tracking store to read, refusing to create an empty local one."""
    from .tracking import absolute_sqlite, default_tracking_uri

    u = absolute_sqlite(uri or default_tracking_uri())
    if u.startswith("sqlite:///") and not Path(u[len("sqlite:///"):]).is_file():
        raise UserError(f"no MLflow store at {u}: run `kdsweep study` first (or pass --tracking-uri)")
    return Tracker(u)


def _kdsweep_experiments(tracker: Tracker) -> list[str]:
    exps = tracker.client.search_experiments(filter_string="name LIKE 'kdsweep/%'")
    return sorted(e.name for e in exps)


def select(tracker: Tracker, dataset: str | None = None, teacher: str | None = None, student: str | None = None,
           seed: int | None = None, studies: list[str] | None = None) -> Selection:
    """The studies of one dataset, teacher -> student pair and seed, read from MLflow."""
    names = _kdsweep_experiments(tracker)
    if not names:
        raise UserError(f"no kdsweep studies in the tracking store {redact(tracker.uri)}: run `kdsweep study` first")
    if dataset is None and teacher is None and student is None:
        if len(names) > 1:
            raise UserError(f"the store holds several pairs ({', '.join(n[len('kdsweep/'):] for n in names)}); "
                            f"choose one with --dataset (and --teacher/--student)")
        experiment = names[0]
        dataset, pair = experiment[len("kdsweep/"):].split("/", 1)
        teacher, student = pair.split("->", 1)
    else:
        spec = get_dataset(dataset or "cifar10")
        dataset, teacher, student = spec.name, teacher or spec.teacher, student or spec.student
        experiment = f"kdsweep/{dataset}/{teacher}->{student}"  # as StudyConfig.experiment_name
        if experiment not in names:
            raise UserError(f"no studies of {dataset} {teacher}->{student} in {redact(tracker.uri)}; "
                            f"it holds: {', '.join(n[len('kdsweep/'):] for n in names)}")
    exp_id = tracker.client.get_experiment_by_name(experiment).experiment_id
    runs = search_all(tracker.client, exp_id)
    by_role: dict[str, list] = {}
    for r in runs:
        by_role.setdefault(r.data.tags.get("kdsweep.role", ""), []).append(r)
    parents = by_role.get("study", [])
    seeds = sorted({int(r.data.params.get("seed", 0)) for r in parents})
    if not parents:
        raise UserError(f"no studies in experiment {experiment!r} of {redact(tracker.uri)}: run `kdsweep study` first")
    if seed is None:
        if len(seeds) > 1:
            raise UserError(f"{experiment} holds studies with seeds {', '.join(map(str, seeds))}; choose one with --seed")
        seed = seeds[0]
    parents = [r for r in parents if int(r.data.params.get("seed", 0)) == seed]
    if not parents:
        raise UserError(f"no studies with seed {seed} in {experiment} (seeds there: {', '.join(map(str, seeds))})")

    sel = Selection(tracker, exp_id, experiment, dataset, teacher, student, seed)
    for p in parents:
        name = p.data.tags["kdsweep.study"]
        trials = [r for r in by_role.get("trial", []) if r.data.tags.get("kdsweep.study") == name]
        s = StudyRuns(p, trials, [])
        s.best = best_trial(trials)
        if s.best is not None:
            s.confirms = [r for r in by_role.get("confirm", [])
                          if r.data.tags.get("kdsweep.study") == name and r.data.tags.get("kdsweep.state") == "COMPLETE"
                          and r.data.tags.get("kdsweep.source_run") == s.best.info.run_id]
        sel.studies.append(s)
    if studies:
        want = set(studies)
        sel.studies = [s for s in sel.studies if s.label in want or s.name in want]
        missing = want - {s.label for s in sel.studies} - {s.name for s in sel.studies}
        if missing:
            raise UserError(f"no study {', '.join(sorted(missing))} in {experiment} (seed {seed}); "
                            f"there: {', '.join(s.label for s in sel.studies) or 'none of those'}")
    sel.studies.sort(key=lambda s: s.label)
    return sel


def best_trial(trials: list) -> Any | None:
    """The COMPLETE trial with the highest validation accuracy; ties go to the earliest, as in Optuna."""
    done = [r for r in trials if r.data.tags.get("kdsweep.state") == "COMPLETE" and "best_val_acc" in r.data.metrics]
    if not done:
        return None
    return max(done, key=lambda r: (r.data.metrics["best_val_acc"], -int(r.data.tags.get("kdsweep.trial", 0))))


def confirm_seeds(study_seed: int, k: int) -> list[int]:
    """The fresh seeds of `kdsweep confirm --seeds k`: fixed, so a larger k extends a smaller one."""
    return [study_seed + 1 + i for i in range(k)]


# ---------------------------------------------------------------- checkpoints and data


def split_data(params: dict[str, str], data_dir: str | None, device: torch.device, stream_seed: int | None = None) -> DeviceData:
    """The splits a study trained on, rebuilt from its logged params.

    `data_size` is logged after the validation slice left, so the size asked
    of the loader is data_size + val_size; with the same seed and val_fraction
    that reproduces the same train/val/test split.
    """
    try:
        n = int(params["data_size"]) + int(params["val_size"])
        return load_data(params["dataset"], data_dir, n, int(params["seed"]), float(params["val_fraction"]), device, stream_seed)
    except KeyError as e:
        raise UserError(f"study run lacks the param {e.args[0]!r}; it was not written by kdsweep study") from None


def download(tracker: Tracker, run_id: str, path: str, dst: Path) -> Path | None:
    d = dst / run_id
    d.mkdir(parents=True, exist_ok=True)
    try:
        return Path(tracker.client.download_artifacts(run_id, path, str(d)))
    except Exception:
        return None


def find_teacher(sel: Selection, dst: Path, say: Say) -> tuple[Path | None, str]:
    """The teacher checkpoint the studies used: their logged path if it is here, else the `teachers` run's artifact.

    Returns (path or None, where it came from / why it is missing).
    """
    named = Counter(s.params.get("teacher_checkpoint", "") for s in sel.studies)
    named.pop("", None)
    if len(named) > 1:
        say(f"note: the studies used {len(named)} different teacher checkpoints; the report uses the most common one")
    wanted = named.most_common(1)[0][0] if named else None
    if wanted and Path(wanted).is_file():
        return Path(wanted), wanted
    exp = sel.tracker.client.get_experiment_by_name(TEACHERS_EXPERIMENT)
    if exp is not None:
        runs = search_all(sel.tracker.client, exp.experiment_id, f"tags.`kdsweep.dataset` = '{sel.dataset}'")
        runs = [r for r in runs if r.data.params.get("arch") == sel.teacher and r.data.params.get("seed") == str(sel.seed)
                and r.info.status == "FINISHED"]
        if wanted:
            runs = [r for r in runs if r.data.tags.get("kdsweep.checkpoint") == wanted]
        for r in sorted(runs, key=lambda r: -r.info.start_time):
            ckpt = Path(r.data.tags.get("kdsweep.checkpoint", "teacher.pt")).name
            got = download(sel.tracker, r.info.run_id, f"checkpoint/{ckpt}", dst)
            if got is not None:
                return got, f"run {r.info.run_id} of experiment {TEACHERS_EXPERIMENT!r}"
    if wanted:
        return None, f"teacher checkpoint {wanted} is not on this machine, nor logged in MLflow"
    return None, "no study names a teacher checkpoint (only teacher-free methods ran)"


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


@dataclass
class Report:
    sel: Selection
    tables: dict[str, pd.DataFrame]  # numeric, for csv/json
    display: dict[str, pd.DataFrame]  # formatted strings, for md/tex/html and the terminal
    notes: list[str]
    curves: dict[str, list[tuple[int, float]]]  # label -> best trial's val_acc per epoch
    bars: pd.DataFrame  # label, acc mean, acc std, n (+ teacher)
    tmp: Path


def _fmt_params(run, names: list[str], fixed: list[str]) -> str:
    p = run.data.params
    parts = [f"{k}={float(p[k]):.4g}" for k in sorted(names) if k in p]
    parts += [f"{k}={float(p[k]):.4g} (fixed)" for k in sorted(fixed) if k in p]
    return ", ".join(parts)


def data_key(params: dict[str, str]) -> tuple:
    return tuple(params.get(k) for k in ("dataset", "data_size", "val_size", "seed", "val_fraction"))


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


def build(sel: Selection, data_dir: str | None = None, device: torch.device | str = "cpu", seeds: int | None = None,
          say: Say = print, latency: bool = True, tmp: Path | None = None) -> Report:
    """Evaluate the selection's best checkpoints and build the three tables (downloads go to `tmp`)."""
    from .models import build_model
    from .profile import count_macs, count_params, latency_ms

    device = torch.device(device)
    if not sel.studies:
        raise UserError("no studies selected")
    tmp = tmp or Path(tempfile.mkdtemp(prefix="kdsweep-report-"))
    notes: list[str] = []

    # Each study is evaluated on the split it trained on; normally they all share one.
    keys = Counter(data_key(s.params) for s in sel.studies)
    if len(keys) > 1:
        notes.append(f"the studies used {len(keys)} different data settings (data_size/val_fraction); "
                     f"each is evaluated on its own split, the teacher row on the most common one")
    budgets = Counter(tuple(s.best.data.params.get(k) for k in ("epochs", "batch_size", "momentum", "weight_decay"))
                      for s in sel.studies if s.best is not None)
    if len(budgets) > 1:
        notes.append("the studies' training budgets differ (epochs, batch size, momentum, weight decay): "
                     + "; ".join("/".join(map(str, b)) for b in budgets) + " - the comparison is not like for like")
    datas: dict[tuple, DeviceData] = {}

    def data_for(params) -> DeviceData:
        k = data_key(params)
        if k not in datas:
            datas[k] = split_data(params, data_dir, device)
        return datas[k]

    main_key = keys.most_common(1)[0][0]
    data = data_for(next(s.params for s in sel.studies if data_key(s.params) == main_key))

    # The teacher: its logits on each split, shared by every comparison.
    t_path, t_where = find_teacher(sel, tmp, say)
    t_logits: dict[tuple, torch.Tensor] = {}
    t_row, t_model = None, None
    if t_path is not None:
        t_model, payload = checkpoint.load_model(t_path, sel.teacher, data.in_shape, data.num_classes)
        t_logits[main_key], labels = predict(t_model, data)
        t_row = {"metrics": all_metrics(t_logits[main_key], labels), "meta": payload.get("meta", {}), "where": t_where}
    else:
        notes.append(f"teacher missing: {t_where}; teacher-comparison metrics are empty")
        say(f"note: teacher missing: {t_where}")

    evaluated: list[Evaluated] = []
    for s in sel.studies:
        if s.best is None:
            evaluated.append(Evaluated(s, [], "no complete trial"))
            continue
        d, k = data_for(s.params), data_key(s.params)
        if t_model is not None and k not in t_logits:
            t_logits[k] = predict(t_model, d)[0]
        runs, source = _runs_to_evaluate(s, sel.seed, seeds)
        out = []
        for r in runs:
            path = download(sel.tracker, r.info.run_id, "checkpoint/student.pt", tmp)
            if path is None:
                say(f"note: {s.label}: run {r.info.run_id} has no checkpoint/student.pt artifact; skipped")
                continue
            model, _ = checkpoint.load_model(path, sel.student, d.in_shape, d.num_classes)
            logits, labels = predict(model, d)
            out.append(all_metrics(logits, labels, t_logits.get(k)))
        evaluated.append(Evaluated(s, out, source if out else "checkpoint missing"))

    # Model cost: one measurement per architecture.
    cost = {}
    for role, arch, model in (("teacher", sel.teacher, t_model), ("student", sel.student, None)):
        m = model if model is not None else build_model(arch, data.in_shape, data.num_classes)
        m = m.to(device)
        cost[role] = {"params": count_params(m), "macs": count_macs(m, data.in_shape),
                      "latency_ms": latency_ms(m, data.in_shape, device) if latency else math.nan}
    if latency:
        notes.append(f"ms/image: median of 10 batches of 128 on {device.type}"
                     + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
                     + ", measured now on this machine (noisy when it is busy)")

    ref = sel.reference
    ref_eval = next((e for e in evaluated if ref is not None and e.study is ref), None)
    ref_acc = ref_eval.values("acc") if ref_eval and ref_eval.runs else []
    if ref is None:
        notes.append(f"no {REFERENCE!r} study: differences to the baseline are not computed")

    # The teacher's row is always there; without a checkpoint it says so and holds only the cost.
    meta = t_row["meta"] if t_row else {}
    t_metrics = t_row["metrics"] if t_row else {k: np.nan for k in METRIC_COLS}
    best_rows = [{"label": "teacher", "method": "teacher", "study": "", "best_trial": np.nan,
                  "best_val_acc": meta.get("val_acc", np.nan), "test_acc": t_metrics["acc"],
                  "params": f"{sel.teacher}, {meta.get('epochs', '?')} epochs" if t_row else sel.teacher,
                  "complete": np.nan, "pruned": np.nan, "failed": np.nan, "train_seconds_best": np.nan,
                  "train_seconds_all": np.nan, "status": "reference" if t_row else "teacher checkpoint missing"}]
    metric_rows = [{"label": "teacher", "method": "teacher", "n": 1 if t_row else 0,
                    "source": "teacher checkpoint" if t_row else "missing", **t_metrics,
                    **{f"{k}_std": np.nan for k in METRIC_COLS}, **cost["teacher"]}]
    for e in evaluated:
        s, c = e.study, e.study.counts()
        b = s.best
        secs_all = sum(r.data.metrics.get("train_seconds", 0.0) for r in s.trials
                       if r.data.tags.get("kdsweep.state") == "COMPLETE")
        best_rows.append({
            "label": s.label, "method": s.method, "study": s.name,
            "best_trial": int(b.data.tags.get("kdsweep.trial", -1)) if b else np.nan,
            "best_val_acc": b.data.metrics.get("best_val_acc", np.nan) if b else np.nan,
            "test_acc": b.data.metrics.get("test_acc", np.nan) if b else np.nan,
            "params": _fmt_params(b, s.searched(), s.fixed()) if b else "",
            "complete": c["complete"], "pruned": c["pruned"], "failed": c["failed"],
            "train_seconds_best": b.data.metrics.get("train_seconds", np.nan) if b else np.nan,
            "train_seconds_all": secs_all,
            "status": ("reference" if s is ref else "ok") if b else "no complete trial",
        })
        row = {"label": s.label, "method": s.method, "n": len(e.runs), "source": e.source}
        for k in METRIC_COLS:
            row[k], row[f"{k}_std"] = mean_std(e.values(k)) if e.runs else (np.nan, np.nan)
        row.update(cost["student"])
        metric_rows.append(row)

    best = pd.DataFrame(best_rows)
    best = best.astype({k: "Int64" for k in ("best_trial", "complete", "pruned", "failed")})
    met = pd.DataFrame(metric_rows)
    # Order: teacher first, then by (mean) test accuracy, methods without data last.
    order = met.assign(_t=met["label"] != "teacher", _a=-met["acc"].fillna(-np.inf)).sort_values(["_t", "_a", "label"]).index
    met = met.loc[order].reset_index(drop=True)
    best = best.set_index("label").loc[met["label"]].reset_index()

    students = met[met["label"] != "teacher"].reset_index(drop=True)
    ranks = rank_table(students[METRIC_COLS])
    rk = pd.concat([students[["label", "method", "n"]], ranks], axis=1)
    rk["acc"], rk["acc_std"] = students["acc"], students["acc_std"]
    ref_mean = mean_std(ref_acc)[0] if ref_acc else np.nan
    rk["delta_acc_vs_ce"] = students["acc"] - ref_mean
    by_label = {e.study.label: e for e in evaluated}
    rk["p_vs_ce"] = [welch_p(by_label[l].values("acc"), ref_acc) if ref is not None and l != ref.label else np.nan
                     for l in students["label"]]

    seeded = [e for e in evaluated if e.source.endswith("confirmation seeds")]
    if seeded:
        ns = sorted({len(e.runs) for e in seeded})
        notes.append(f"metrics: mean ± sample std over {'/'.join(map(str, ns))} confirmation seeds per method "
                     f"(fresh init and batch order, same split and teacher; the tuning trial is not counted); "
                     f"p_vs_ce: two-sided Welch t-test of test accuracy vs {REFERENCE}")
        plain = [e.study.label for e in evaluated if e.source == "best trial"]
        if plain:
            notes.append(f"not confirmed (single best trial, no p-value): {', '.join(plain)}")
    else:
        notes.append("one run per method (its best trial): run `kdsweep confirm` for mean ± std and p-values")
    for e in evaluated:
        if not e.runs:
            notes.append(f"{e.study.label}: {e.source}")

    curves = {}
    for s in sel.studies:
        if s.best is not None:
            hist = sel.tracker.client.get_metric_history(s.best.info.run_id, "val_acc")
            curves[s.label] = sorted((m.step, m.value) for m in hist)
    bars = met[["label", "acc", "acc_std", "n"]].copy()

    tables = {"best": best, "metrics": met, "ranks": rk}
    display = {"best": _display_best(best), "metrics": _display_metrics(met), "ranks": _display_ranks(rk)}
    return Report(sel, tables, display, notes, curves, bars, tmp)


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
        "params": df["params"], "trial": df["best_trial"].map(_int), "complete": df["complete"].map(_int),
        "pruned": df["pruned"].map(_int), "failed": df["failed"].map(_int),
        "train s (best)": df["train_seconds_best"].map(lambda v: _num(v, 1)),
        "train s (all)": df["train_seconds_all"].map(lambda v: _num(v, 1)), "status": df["status"],
    })


def _display_metrics(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"method": df["label"], "n": df["n"].map(_int)})
    for k in METRIC_COLS:
        out[k] = [_pm(m, s) for m, s in zip(df[k], df[f"{k}_std"])]
    out["params"] = df["params"].map(lambda v: f"{int(v):,}")
    out["MACs"] = df["macs"].map(lambda v: f"{int(v):,}")
    out["ms/image"] = df["latency_ms"].map(lambda v: _num(v, 4))
    return out


def _display_ranks(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"method": df["label"], "n": df["n"].map(_int)})
    for k in METRIC_COLS:
        out[k] = df[f"{k}_rank"].map(_int)
    out["avg rank"] = df["avg_rank"].map(lambda v: _num(v, 2))
    out["test acc"] = [_pm(m, s) for m, s in zip(df["acc"], df["acc_std"])]
    out["Δ acc vs ce"] = df["delta_acc_vs_ce"].map(lambda v: "–" if _missing(v) else f"{v:+.4f}")
    out["p vs ce"] = df["p_vs_ce"].map(lambda v: "–" if _missing(v) else f"{v:.3g}")
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


TITLES = {"best": "Best trial per method", "metrics": "Test metrics of the best config", "ranks": "Ranks"}


def to_markdown(rep: Report) -> str:
    s = rep.sel
    lines = [f"# kdsweep report: {s.dataset}, {s.teacher} -> {s.student}, seed {s.seed}", "",
             f"MLflow experiment `{s.experiment}` at {redact(s.tracker.uri)}", ""]
    for name in TABLES:
        lines += [f"## {TITLES[name]}", "", markdown_table(rep.display[name]), ""]
    lines += ["Directions: " + ", ".join(f"{k} {'higher' if d > 0 else 'lower'} is better" for k, d in DIRECTIONS.items())
              + "; ECE over 10 bins; KL is KL(teacher || student) in nats; ranks among the students (1 = best, "
              "ties share the best rank).", ""]
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


_RANGE = re.compile(r"^\[([^,\]]+), ([^\]]+)\]( log)?$")


def optuna_study(s: StudyRuns):
    """An in-memory Optuna study holding the study's trials as MLflow recorded them (for Optuna's plots)."""
    import optuna
    from optuna.distributions import FloatDistribution

    names = s.searched()
    dists = {}
    for k in names:
        m = _RANGE.match(s.params.get(f"space.{k}", ""))
        if m:
            dists[k] = FloatDistribution(float(m.group(1)), float(m.group(2)), log=bool(m.group(3)))
        else:  # an unreadable range: the observed one
            vals = [float(r.data.params[k]) for r in s.trials if k in r.data.params]
            dists[k] = FloatDistribution(min(vals), max(vals)) if vals else None
    dists = {k: v for k, v in dists.items() if v is not None}
    study = optuna.create_study(direction="maximize", study_name=s.name)
    states = {"COMPLETE": optuna.trial.TrialState.COMPLETE, "PRUNED": optuna.trial.TrialState.PRUNED,
              "FAIL": optuna.trial.TrialState.FAIL}
    for r in sorted(s.trials, key=lambda r: int(r.data.tags.get("kdsweep.trial", 0))):
        state = states.get(r.data.tags.get("kdsweep.state", ""))
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
    run = t.start(s.experiment_id, f"report-s{s.seed}", {"kdsweep.role": "report", "kdsweep.dataset": s.dataset,
                                                         **leftovers.owner_tags()})
    try:
        t.log(run, params={"dataset": s.dataset, "teacher": s.teacher, "student": s.student, "seed": s.seed,
                           "studies": ",".join(x.label for x in s.studies)})
        for f in files:
            t.client.log_artifact(run, str(f), "report/plots" if f.suffix == ".png" else "report")
    except BaseException as e:
        with contextlib.suppress(Exception):  # best effort: else the next report closes it (its owner is gone)
            t.close(run, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED",
                    {"kdsweep.reason": "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {str(e)[:200]}"})
        raise
    t.end(run)
    return run


_REPORT_FILE = re.compile(r"^((best|metrics|ranks)\.(md|csv|tex|html|json)|report\.md|plots)$")


def run_report(tracking_uri: str | None = None, dataset: str | None = None, teacher: str | None = None,
               student: str | None = None, seed: int | None = None, studies: list[str] | None = None,
               formats: str | None = None, out: str | None = None, seeds: int | None = None, device: str = "auto",
               data_dir: str | None = None, plots: bool = True, log: bool = True, say: Say = print,
               show: Callable[[str], None] = print) -> Report:
    """`kdsweep report`: select, (confirm), evaluate, print markdown, export, plot, log."""
    from .study import resolve_device

    fmts = parse_formats(formats) if formats else []
    if fmts and not out:
        raise UserError("--format needs --out DIR (without it the report is printed as markdown)")
    if out:
        leftovers.check_out(Path(out), _REPORT_FILE.match)
    dev = resolve_device(device)
    tracker = open_tracker(tracking_uri)
    sel = select(tracker, dataset, teacher, student, seed, studies)
    if log:
        _check_writable(tracker)
    if log or seeds is not None:  # --no-log writes nothing to MLflow (the store may be read-only)
        leftovers.close_dead_runs(tracker, sel.experiment_id, ("report",), say)
    if seeds is not None:
        from .confirm import confirm

        confirm(sel, seeds, dev, data_dir, say)
        sel = select(tracker, sel.dataset, sel.teacher, sel.student, sel.seed, studies)  # pick up the new runs
    with leftovers.tmp_dir("kdsweep-report") as tmp:
        rep = build(sel, data_dir, dev, seeds, say, tmp=tmp)
        show(to_markdown(rep))
        with (leftovers.atomic_dir(Path(out), _REPORT_FILE.match) if out else contextlib.nullcontext(tmp / "out")) as out_dir:
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


def _check_writable(tracker: Tracker) -> None:
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
        from . import plots as P

        pdir = out_dir / "plots"
        title = f"{sel.dataset}: {sel.teacher} -> {sel.student}, seed {sel.seed}"
        ref = sel.reference.label if sel.reference else None
        files.append(P.acc_bars(rep.bars, pdir / "test_acc.png", title, ref))
        files.append(P.val_curves(rep.curves, pdir / "val_curves.png", f"best trial per method - {title}"))
        for s in sel.studies:
            files += P.optuna_plots(optuna_study(s), s.label, pdir, say)
    return files
