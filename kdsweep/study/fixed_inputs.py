"""What a study compares must stay the same: its teacher's weights and its data split.

A study records, when it is created, the SHA-256 of its teacher's weights
(teacher_cache.model_digest, the digest a teacher file carries) and a digest
of its train and validation splits. A worker or a resume that brings another
teacher or another split is refused with one line naming both, before it
trains anything: trials of one study are only comparable if every student
learned from the same teacher on the same images.
"""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Any, Mapping

from kdsweep.common.digests import tensor_digest
from kdsweep.common.errors import UserError

TEACHER_ATTR = "kdsweep_teacher"  # {"sha256", "path"}
SPLIT_ATTR = "kdsweep_split"  # {"sha256", "train", "val", "host": the host that recorded it}


def split_digest(data) -> str:
    """SHA-256 of a DeviceData's train and validation images and labels (the uint8 bytes; memoised per tensor)."""
    h = hashlib.sha256()
    for t in (data.train_x, data.train_y, data.val_x, data.val_y):
        h.update(tensor_digest(t).encode())
    return h.hexdigest()


def split_record(data) -> dict[str, Any]:
    # The host: each host generates or reads the data itself, so a refusal can say whose data differs.
    return {"sha256": split_digest(data), "train": int(len(data.train_y)), "val": int(len(data.val_y)),
            "host": socket.gethostname()}


def teacher_record(info: Mapping[str, Any]) -> dict[str, Any] | None:
    """From get_teacher's info; None for a method without a teacher."""
    if not info.get("sha256"):
        return None
    path = info.get("path")
    return {"sha256": info["sha256"], "path": os.path.abspath(path) if path else ""}


def _teacher_words(rec: Mapping[str, Any]) -> str:
    path = rec.get("path")
    return f"{str(rec.get('sha256', '?'))[:12]}" + (f" ({path})" if path else "")


def _split_words(rec: Mapping[str, Any]) -> str:
    return f"{str(rec.get('sha256', '?'))[:12]} ({rec.get('train', '?')} train / {rec.get('val', '?')} val images)"


def problem(attrs: Mapping[str, Any], split: Mapping[str, Any] | None, teacher: Mapping[str, Any] | None) -> str | None:
    """What differs between a study's recorded identity (its user attrs) and this worker's (None: nothing)."""
    old = attrs.get(SPLIT_ATTR)
    if split is not None and old and old.get("sha256") != split["sha256"]:
        here, there = split.get("host", "?"), old.get("host")
        whose = (f"the data on host {here} differs from host {there}'s" if there and there != here
                 else f"the data on host {here} changed")
        return (f"its data split is {_split_words(old)}{f' (recorded on host {there})' if there else ''}, this run's is "
                f"{_split_words(split)}: {whose}")
    old = attrs.get(TEACHER_ATTR)
    if teacher is not None and old and old.get("sha256") != teacher["sha256"]:
        return f"its teacher is {_teacher_words(old)}, this run's is {_teacher_words(teacher)}"
    return None


def check(name: str, attrs: Mapping[str, Any], split: Mapping[str, Any] | None, teacher: Mapping[str, Any] | None) -> None:
    why = problem(attrs, split, teacher)
    if why:
        raise UserError(f"study {name!r} cannot take this run: {why}; trials are only comparable with one teacher "
                        f"and one split (use the original ones to resume, or --study-name NEW for a new study)")


def check_and_record(study, split: Mapping[str, Any] | None, teacher: Mapping[str, Any] | None) -> None:
    """Under the study lock: refuse a mismatch, else record what the study has not recorded yet."""
    attrs = study.user_attrs
    check(study.study_name, attrs, split, teacher)
    if split is not None and SPLIT_ATTR not in attrs:
        study.set_user_attr(SPLIT_ATTR, dict(split))
    if teacher is not None and TEACHER_ATTR not in attrs:
        study.set_user_attr(TEACHER_ATTR, dict(teacher))
