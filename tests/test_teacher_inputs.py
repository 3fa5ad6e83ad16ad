"""The teacher's inputs are a stated part of the study (issue 22, item 1): a teacher trained elsewhere either runs
with its own preprocessing or is refused in one line, a random teacher is refused, and --accept-teacher overrides."""

from __future__ import annotations

import optuna
import pytest
import torch
import torch.nn as nn
from mlflow.tracking import MlflowClient

import kdsweep.api as kd
from kdsweep.common.errors import UserError
from kdsweep.data import inputs
from kdsweep.data.dispatch import load_data
from kdsweep.training.teacher import teacher_problem

STUDY = dict(dataset="digits", student="digitnet_s", trials=1, epochs=1, batch_size=64, device="cpu", pruner="none")


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _teacher_on_unit_inputs() -> nn.Module:
    """A plain-PyTorch digits teacher trained on pixels scaled to [0, 1], as torchvision's ToTensor() gives them."""
    data = load_data("digits", None, None, 0, 0.1, torch.device("cpu"), preprocess="none")
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x = data.train_x.float() / 255
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), data.train_y).backward()
        opt.step()
    return model.eval()


def _studies(workdir) -> list[str]:
    db = workdir / "mlruns" / "optuna.db"
    return optuna.get_all_study_names(f"sqlite:///{db}") if db.exists() else []


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_a_teacher_trained_on_unit_inputs_runs_with_its_preprocessing_or_is_refused(workdir):
    teacher = _teacher_on_unit_inputs()
    with pytest.raises(UserError) as e:  # the default standardizes: not what this teacher saw
        kd.study("vanilla_kd", teacher=teacher, **STUDY)
    line = _one_line(e)
    assert "with --preprocess none: it was trained on other inputs" in line
    assert "preprocessed as standardize with the dataset's declared statistics (mean 0.3, std 0.37)" in line
    assert "--accept-teacher" in line

    r = kd.study("vanilla_kd", teacher=teacher, study_name="unit", preprocess="none", **STUDY)
    assert r.summary["teacher"]["val_acc"] > 0.9 and r.summary["complete"] == 1
    # The preprocessing is part of the study: a resume with another one is refused before the teacher is judged.
    with pytest.raises(UserError, match="preprocess: none -> standardize"):
        kd.study("vanilla_kd", teacher=teacher, study_name="unit", accept_teacher=True, **STUDY)
    # ... and of the built name, so the two never meet by default.
    named = kd.study("ce", preprocess="none", **{**STUDY, "student": "digitnet_s"}).summary["study"]
    assert named.endswith("-pnone")


def test_a_random_teacher_is_refused_and_accept_teacher_overrides(workdir):
    torch.manual_seed(3)
    random_teacher = _mlp()
    with pytest.raises(UserError) as e:
        kd.study("vanilla_kd", teacher=random_teacher, preprocess="none", **STUDY)
    assert "near chance (0.100 for 10 classes" in _one_line(e)
    assert _studies(workdir) == []  # refused before any study or trial
    with pytest.raises(UserError, match="near chance"):  # a sweep: before ce, which needs no teacher, trains
        kd.sweep(["ce", "vanilla_kd"], teacher=random_teacher, preprocess="none", **STUDY)
    assert _studies(workdir) == []

    r = kd.study("vanilla_kd", teacher=random_teacher, preprocess="none", accept_teacher=True, **STUDY)
    assert r.summary["complete"] == 1
    # By its absolute path: MLflow keeps one store per URI string, and another test's mlruns/ had the relative one.
    parent = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}").get_run(r.summary["parent_run"])
    assert parent.data.tags["kdsweep.teacher_accepted"].startswith("--accept-teacher: it scores val_acc")
    assert parent.data.params["preprocess"] == "none"


def test_the_teacher_rule_in_numbers():
    assert teacher_problem(0.25, None, 4, 200)  # chance on 4 classes
    assert teacher_problem(0.229, None, 10, 180)  # issue 22's teacher fed standardized inputs
    assert teacher_problem(0.92, None, 10, 180) is None
    assert teacher_problem(0.55, None, 2, 100)  # within 3 standard errors of a coin
    assert teacher_problem(0.80, 0.95, 10, 500)  # far below its checkpoint's own score
    assert teacher_problem(0.90, 0.95, 10, 500) is None  # another split scores a little differently
    assert "you say it scored" in teacher_problem(0.80, None, 10, 500, claimed=0.95)  # --teacher-val-acc
    assert teacher_problem(0.90, None, 10, 500, claimed=0.95) is None
    assert "with --preprocess none" in teacher_problem(0.77, None, 10, 144, {"none": 0.98})
    assert teacher_problem(0.95, None, 10, 144, {"none": 0.96}) is None


@pytest.mark.parametrize("text, want", [("standardize", ("standardize", "")), ("none", ("none", "pnone")),
                                        ("0.5/0.25", ("given", "p")), ("0.1,0.2,0.3/1,1,1", ("given", "p"))])
def test_preprocess_settings_parse(text, want):
    how = inputs.parse(text)
    assert how.kind == want[0] and how.tag.startswith(want[1])


@pytest.mark.parametrize("text", ["minmax", "0.5", "0.5/", "0.1,0.2/0.3", "0.5/0"])
def test_bad_preprocess_settings_are_one_line(text):
    with pytest.raises(UserError, match="--preprocess"):
        inputs.parse(text)


def test_a_teacher_far_below_the_score_its_user_gives_is_refused(workdir):
    """--teacher-val-acc: the user's own measurement of the teacher they bring is a claim it is held to."""
    data = load_data("digits", None, None, 0, 0.1, torch.device("cpu"), preprocess="none")
    torch.manual_seed(0)
    teacher = _mlp()
    opt = torch.optim.Adam(teacher.parameters(), 1e-2)
    for _ in range(4):  # a few steps: well above chance, well below the 0.99 claimed for it
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(data.train_x.float() / 255), data.train_y).backward()
        opt.step()
    with pytest.raises(UserError) as e:
        kd.study("vanilla_kd", teacher=teacher.eval(), preprocess="none", teacher_val_acc=0.99, **STUDY)
    assert "far below the 0.990 you say it scored (--teacher-val-acc)" in _one_line(e)
    assert _studies(workdir) == []

