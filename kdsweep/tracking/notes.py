"""A study in words, for the people who open it in the MLflow UI (issue 13).

The parent run's description (the tag `mlflow.note.content`, which MLflow
shows as the run's description, in markdown) says what the study is, how far
it got and the command that resumes it; it is rewritten whenever a run of the
study starts and ends.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from typing import Any

from kdsweep.common.uris import redact
from kdsweep.tracking.vocabulary import STATE_TAG

# Flags shown only when they differ from StudyConfig's defaults (the others define the study and are always shown).
_IF_NOT_DEFAULT = (("seed", "--seed"), ("data_size", "--data-size"), ("image_size", "--image-size"), ("val_fraction", "--val-fraction"),
                   ("momentum", "--momentum"), ("weight_decay", "--weight-decay"), ("sampler", "--sampler"),
                   ("pruner", "--pruner"), ("data_dir", "--data-dir"), ("study_name", "--study-name"),
                   ("teacher_feature", "--teacher-feature"), ("teacher_embedding", "--teacher-embedding"),
                   ("student_feature", "--student-feature"), ("student_embedding", "--student-embedding"))


def resume_command(cfg: Any) -> str:
    """`kdsweep study ...` that finds this study again: its settings and budget, storage and store if not the defaults."""
    from kdsweep.data.dispatch import get_dataset

    spec = get_dataset(cfg.dataset)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    # A study file by the path it was given (a bare name is always the method: config.find_study).
    args = ["kdsweep", "study", getattr(cfg, "study_file", None) or cfg.name, "--dataset", cfg.dataset]
    if (cfg.teacher, cfg.student) != (spec.teacher, spec.student):
        args += ["--teacher", cfg.teacher, "--student", cfg.student]
    args += ["--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size)]
    if cfg.teacher_epochs != spec.teacher_epochs:
        args += ["--teacher-epochs", str(cfg.teacher_epochs)]
    for key, flag in _IF_NOT_DEFAULT:
        value = getattr(cfg, key, None)
        if value is not None and value != defaults.get(key):
            args += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if cfg.trials is not None:
        args += ["--trials", str(cfg.trials)]
    if cfg.budget_epochs is not None:
        args += ["--budget-epochs", str(cfg.budget_epochs)]
    for key, flag in (("storage", "--storage"), ("tracking_uri", "--tracking-uri")):
        if getattr(cfg, key, None):
            args += [flag, redact(getattr(cfg, key))]
    return " ".join(shlex.quote(a) for a in args)


def study_summary(cfg: Any, spent: str, best: dict | None) -> str:
    """One line: what the study compares, its budget, what it has spent, its best trial."""
    line = (f"{cfg.method} ({cfg.name}) on {cfg.dataset}, {cfg.teacher} -> {cfg.student}, seed {cfg.seed}: "
            f"{cfg.epochs}-epoch trials of batch {cfg.batch_size}; budget {cfg.budget.describe()}; spent {spent}")
    if best:
        test = best.get("test_acc")
        line += (f"; best val_acc {best['val_acc']:.4f} (trial {best['number']})"
                 + (f", its test_acc {test:.4f}" if isinstance(test, (int, float)) else ""))
    return line


def study_note(cfg: Any, spent: str, best: dict | None) -> str:
    """The parent run's description: the summary line and the command that resumes (or extends) the study."""
    where = "" if cfg.storage or cfg.tracking_uri else " (in the directory that holds mlruns/)"
    return (f"{study_summary(cfg, spent, best)}\n\n"
            f"Resume it{where}; a larger --trials or --budget-epochs adds the difference:\n\n"
            f"    {resume_command(cfg)}\n\n"
            f"Trials are the child runs t000, t001, ...; epochs in messages count from 1, MLflow's steps from 0.\n")


# ---------------------------------------------------------------- what the MLflow UI opens on (issue 22)
#
# Checked in headless Chromium against MLflow 3.17's UI:
#   * the experiment tag mlflow.experimentKind does not choose the landing page (the UI follows its GenAI /
#     "Model training" toggle, kept by the browser); the URL parameter workflowType=machine_learning does;
#   * the URL can sort (orderByKey, orderByAsc) and filter (searchFilter), but not choose columns;
#   * a saved view can: an experiment tag mlflow.sharedViewState.<key> holding {name, createdAt, updatedAt,
#     state} (state: the runs page's settings as JSON), opened by ?viewStateShareKey=<key> and listed under
#     "Views". Its columns (order, widths), sort, filter and charts are applied; the rows' expansion and
#     the table/chart switch are not part of it (the URL's compareRunsMode=CHART is).

KIND_TAG = "mlflow.experimentKind"
KIND_MODEL_TRAINING = "custom_model_development"
VIEW_TAG = "mlflow.sharedViewState."
STUDIES_VIEW = "kdsweep-studies"
TRIALS_VIEW = "kdsweep-trials"
RUN_NAME_COLUMN = "attributes.`Run Name`"


def _metrics(*keys: str) -> list[str]:
    return [f"metrics.`{k}`" for k in keys]


def _tags(*keys: str) -> list[str]:
    return [f"tags.`{k}`" for k in keys]


def _columns(names: list[str], widths: dict[str, int]) -> dict[str, Any]:
    """Columns shown, in this order after the run name (MLflow applies widths only to ordered columns;
    the columns not named, Created and Duration, go last)."""
    order = [RUN_NAME_COLUMN, *names]
    return {"selectedColumns": names, "columnOrder": order,
            "columnWidths": {c: widths.get(c, 140 if c.startswith("metrics.") else 120) for c in order}}


def _charts(section: str, *charts: tuple[str, str]) -> dict[str, Any]:
    """The chart view: one section of (type, metric) charts, in place of MLflow's chart per metric (the parent
    runs' best.* hold one point each). A bar chart shows each run's last value, a line chart the epochs."""
    sid = f"kdsweep-{section}"
    cards = []
    for kind, metric in charts:
        card = {"uuid": f"{sid}-{metric}", "type": kind, "metricKey": metric, "displayName": metric,
                "metricSectionId": sid, "runsCountToCompare": 30, "deleted": False, "isGenerated": False}
        if kind == "LINE":
            card.update(selectedMetricKeys=[metric], xAxisKey="step", lineSmoothness=0, scaleType="linear",
                        xAxisScaleType="linear", useGlobalXaxisKey=False, useGlobalLineSmoothing=False)
        cards.append(card)
    return {"compareRunCharts": cards, "compareRunSections": [{"uuid": sid, "name": f"kdsweep: {section}", "display": True,
                                                               "isReordered": False, "deleted": False, "isGenerated": False}]}


# key -> (name in the "Views" menu, the runs page's settings)
VIEWS: dict[str, tuple[str, dict[str, Any]]] = {
    STUDIES_VIEW: ("kdsweep: studies, best first", {
        # One row per study, ranked by its best trial's val_acc (the objective); the full study name is shown
        # (it holds the per-trial settings, e.g. e3 / e5), and the charts are the studies' best_* values.
        "searchFilter": "tags.`kdsweep.role` = 'study'",
        "orderByKey": "metrics.`best_val_acc`", "orderByAsc": False,
        **_columns(_metrics("best_val_acc", "best_test_acc") + _tags("kdsweep.per_trial")
                   + _metrics("best_trial", "trials_complete", "trials_pruned", "trials_fail") + _tags("kdsweep.budget"),
                   {RUN_NAME_COLUMN: 380, "tags.`kdsweep.per_trial`": 130, "metrics.`best_trial`": 100}),
        **_charts("each study's best trial", ("BAR", "best_val_acc"), ("BAR", "best_test_acc")),
        "runsHiddenMode": "SHOW_ALL",  # every study in the charts (MLflow: the first 10)
    }),
    TRIALS_VIEW: ("kdsweep: trials, objective first", {
        # Every trial of every study (named "LABEL PER-TRIAL tNNN"), ranked by the objective: best_val_acc is the
        # best epoch's val_acc, what Optuna maximised (val_acc is the last epoch's); kdsweep.state says COMPLETE /
        # PRUNED / FAIL.
        "searchFilter": "tags.`kdsweep.role` = 'trial'",
        "orderByKey": "metrics.`best_val_acc`", "orderByAsc": False,
        **_columns(_metrics("best_val_acc", "test_acc") + _tags(STATE_TAG, "kdsweep.study")
                   + _metrics("best_epoch", "epochs_trained"),
                   {RUN_NAME_COLUMN: 220, "tags.`kdsweep.study`": 380, "metrics.`best_epoch`": 100}),
        **_charts("trials", ("BAR", "best_val_acc"), ("LINE", "val_acc"), ("BAR", "test_acc")),
        "runsHiddenMode": "FIRST_20_RUNS",  # the 20 best trials in the charts (MLflow: the first 10)
    }),
}


def view_tags(now_ms: int) -> dict[str, str]:
    """The experiment tags that hold kdsweep's saved views of the runs page."""
    return {VIEW_TAG + key: json.dumps({"name": name, "createdAt": now_ms, "updatedAt": now_ms,
                                        "state": json.dumps(state)})
            for key, (name, state) in VIEWS.items()}


def ui_tags(experiment: str, now_ms: int) -> dict[str, str]:
    """Tags a kdsweep experiment starts with, each written only where missing (a user's own stays): MLflow's
    model-training kind and, for study experiments (kdsweep/...), the saved views of the runs page."""
    tags = {KIND_TAG: KIND_MODEL_TRAINING}
    if experiment.startswith("kdsweep/"):
        tags.update(view_tags(now_ms))
    return tags


def runs_url(base: str, experiment_id: str, view: str | None = STUDIES_VIEW) -> str:
    """The runs table of an experiment in the model-training view, opened on a saved view when given."""
    query = "workflowType=machine_learning" + (f"&viewStateShareKey={view}" if view else "")
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"
