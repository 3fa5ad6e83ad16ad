"""Whether a teacher -> student pair can serve a method, the tags that name the pair, and whether
settings may resume an existing study.
"""

from __future__ import annotations

import optuna

from kdsweep.common.errors import UserError
from kdsweep.data.dispatch import dataset_shape
from kdsweep.methods.registry import get_method
from kdsweep.models import factory
from kdsweep.study.config import StudyConfig
from kdsweep.tracking.vocabulary import CONFIG_ATTR


def pair_tags(cfg: StudyConfig) -> dict[str, str]:
    """The pair an experiment holds, as tags: its name cannot be split back when a spec holds '/' or '->'."""
    return {"kdsweep.dataset": cfg.dataset, "kdsweep.teacher": cfg.teacher, "kdsweep.student": cfg.student}


def pair_problem(cfg: StudyConfig) -> str | None:
    """Why the study's teacher -> student pair cannot serve its method (None if it can); no data needed."""
    in_shape, num_classes = dataset_shape(cfg.dataset, cfg.data_dir, cfg.image_size)
    method_cls = get_method(cfg.method)
    # Builds each model once and runs one tiny forward: a model that cannot be built, returns no (batch, classes)
    # logits or lacks a tap path is refused here (UserError), before anything is written or trained.
    why = method_cls.unsupported(*factory.pair_shapes(cfg, method_cls, in_shape, num_classes))
    return f"{why}; {cfg.teacher} -> {cfg.student} cannot serve it" if why else None


def check_pair(cfg: StudyConfig) -> None:
    why = pair_problem(cfg)
    if why:
        raise UserError(f"{why} (choose another --teacher/--student, or other layers with --teacher-feature/--student-feature)")


def _conflict(study: optuna.Study, cfg: StudyConfig) -> str | None:
    """How `cfg` differs from what the existing study was created with (None: it may resume)."""
    old = study.user_attrs.get(CONFIG_ATTR)
    if old is None:
        return None
    new = cfg.fingerprint()
    diff = [k for k in new if k in old and old[k] != new[k]]  # keys an older kdsweep did not record are not judged
    if not diff:
        return None
    changes = "; ".join(f"{k}: {old[k]} -> {new[k]}" for k in diff)
    return f"study {cfg.full_study_name!r} exists with other settings ({changes})"


def study_conflict(cfg: StudyConfig, storage: optuna.storages.RDBStorage) -> str | None:
    """Read-only: why `cfg` cannot resume the study of its name in `storage` (None if it is new or fits)."""
    if cfg.full_study_name not in optuna.get_all_study_names(storage):
        return None
    return _conflict(optuna.load_study(study_name=cfg.full_study_name, storage=storage), cfg)
