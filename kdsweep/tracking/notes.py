"""A study in words, for the people who open it in the MLflow UI (issue 13).

The parent run's description (the tag `mlflow.note.content`, which MLflow
shows as the run's description, in markdown) says what the study is, how far
it got and the command that resumes it; it is rewritten whenever a run of the
study starts and ends.
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any

from kdsweep.common.uris import redact

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
