"""The Python API (issue 12, acceptance 3): a notebook runs a sweep and a report and gets DataFrames back,
with models and data passed as Python objects."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn as nn

import kdsweep.api as kd
from kdsweep.common.errors import UserError
from kdsweep.study import naming

TINY = dict(dataset="digits", data_size=400, epochs=2, teacher_epochs=2, batch_size=32, device="cpu")


class Student(nn.Module):
    """A user's own student, importable as test_api:Student (the spec another process could rebuild)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_sweep_and_report_return_dataframes(workdir):
    # The store holds more studies of the pair with other per-trial settings (a report would pick those by default).
    other = kd.sweep(["ce", "vanilla_kd", "dkd"], trials=1, **{**TINY, "epochs": 1})
    result = kd.sweep(["ce", "vanilla_kd"], trials=2, **TINY)
    table = result.table
    assert isinstance(table, pd.DataFrame) and set(table["method"]) == {"ce", "vanilla_kd"}
    for label, r in result.studies.items():
        assert isinstance(r.trials, pd.DataFrame) and len(r.trials) == 2
        assert r.best["val_acc"] == pytest.approx(r.trials["val_acc"].max())
        assert table.set_index("method").loc[label, "val_acc"] == pytest.approx(r.best["val_acc"])
    assert set(result.confirm(seeds=1)["method"]) == {"ce", "vanilla_kd"}
    tables = result.report()
    studies = set(tables["best"]["study"].dropna())  # this sweep's studies, not the other 1-epoch one
    assert {r.summary["study"] for r in result.studies.values()} <= studies
    assert not {r.summary["study"] for r in other.studies.values()} & studies
    assert {"best", "ranking"} <= set(tables) and all(isinstance(t, pd.DataFrame) for t in tables.values())
    best = tables["best"]
    assert len(best) >= 2 and best.select_dtypes("number").size > 0
    # A second run of the same sweep resumes the studies: nothing is left to train.
    again = kd.sweep(["ce", "vanilla_kd"], trials=2, **TINY)
    assert again.table["epochs"].tolist() == table.set_index("method").loc[again.table["method"], "epochs"].tolist()


def _tensors(n_train=300, n_test=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n_train + n_test,), generator=g)
    x = (torch.rand(n_train + n_test, 1, 8, 8, generator=g) * 80 + y.view(-1, 1, 1, 1) * 60).to(torch.uint8)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def test_modules_factories_and_tensors_from_a_notebook(workdir):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(16, 3))

    def tiny_student(num_classes):  # defined in the notebook: registered in this process by its name and code
        return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

    data = _tensors()
    r = kd.study("vanilla_kd", teacher=teacher, student=tiny_student, data=data, trials=2, epochs=1, batch_size=32,
                 device="cpu", accept_teacher=True)  # untrained: how objects are named is what this test asks
    assert r.summary["complete"] + r.summary["pruned"] == 2
    name = r.summary["study"]
    # Named by the variables that hold them (the same on every rerun), a function by its own name.
    assert "py.data-" in name and "py.teacher-" in name and "py.tiny_student-" in name
    # The same objects again find the same study (names come from content, not memory addresses).
    again = kd.study("vanilla_kd", teacher=teacher, student=tiny_student, data=_tensors(), trials=2, epochs=1,
                     batch_size=32, device="cpu", accept_teacher=True)
    assert again.summary["study"] == name and again.summary["epochs"] == r.summary["epochs"]
    # The teacher module was used as trained, through a weights file: its digest is the study's teacher.
    import mlflow

    from kdsweep.common.digests import model_digest

    mlflow.set_tracking_uri("sqlite:///mlruns/mlflow.db")
    parents = mlflow.search_runs(search_all_experiments=True, filter_string=f"params.study = '{name}'")
    assert set(parents["params.teacher_sha256"].dropna()) == {model_digest(teacher)}
    # An importable class is named by its import path, so `kdsweep report` in a shell can rebuild it.
    assert naming.model_name(Student) == "test_api:Student"


def test_bad_settings_and_objects_are_one_line_errors(workdir):
    with pytest.raises(UserError, match="unknown setting"):
        kd.study("vanilla_kd", epochz=3)
    with pytest.raises(UserError, match="data= or dataset="):
        kd.study("vanilla_kd", data=_tensors(), dataset="digits")
    with pytest.raises(UserError, match="train_x, train_y, test_x, test_y"):
        kd.study("vanilla_kd", data=(1, 2), teacher="digitnet_l", student="digitnet_s")
    with pytest.raises(UserError, match="nn.Module or a factory"):
        kd.study("vanilla_kd", dataset="digits", teacher=42)


def test_a_model_name_with_slashes_is_found_again_by_report(workdir):
    # Experiment names cannot be split back when a spec holds '/' (timm's hf-hub:org/model): the pair is read
    # from the experiment's tags.
    from kdsweep.models import specs

    specs.register("org/tiny-net", lambda num_classes: nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes)))
    try:
        r = kd.study("ce", student="org/tiny-net", trials=1, **{**TINY, "epochs": 1})
        tables = kd.report(log=False)  # the only pair in the store: found without naming it
        assert r.summary["study"] in set(tables["best"]["study"].dropna())
    finally:
        specs.unregister("org/tiny-net")


def test_confirm_without_a_selection_acts_on_the_sweep_just_run(workdir):
    """Seen (issue 22): the README swept every method at 3 epochs, then three at 5, and `confirm` confirmed the
    3-epoch studies ('the setting most studies share'), none of the sweep just run."""
    kd.sweep(["ce", "vanilla_kd", "dkd"], trials=1, **{**TINY, "epochs": 1})
    latest = kd.sweep(["ce"], trials=1, **TINY)
    said = []
    table = kd.confirm(seeds=1, dataset="digits", device="cpu", say=said.append)
    assert list(table["method"]) == ["ce"] and table.loc[0, "trained"] == 1
    per_trial = latest.studies["ce"].summary["study"].rsplit("-e", 1)[-1]
    assert said[0].startswith(f"note: studies with per-trial settings e{per_trial} (the most recent) are compared"), said


def test_a_sweeps_confirm_and_report_keep_to_its_own_methods(workdir):
    """Seen (issue 22): after a CLI sweep with dkd, the API sweep ["ce", "vanilla_kd"] with the same settings had
    its confirm() train dkd too, and its report() rank it."""
    kd.sweep(["dkd"], trials=1, **TINY)
    result = kd.sweep(["ce", "vanilla_kd"], trials=1, **TINY)
    assert set(result.confirm(seeds=1)["method"]) == {"ce", "vanilla_kd"}
    assert set(result.report()["best"]["method"]) <= {"ce", "vanilla_kd", "teacher"}


def test_objects_are_named_by_the_variable_that_holds_them():
    torch.manual_seed(0)
    my_teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    assert naming.model_name(my_teacher).startswith("py.my_teacher-")
    assert naming.model_name(nn.Sequential(nn.Flatten(), nn.Linear(64, 3))).startswith("py.Sequential-")  # no variable
    digits_arrays = _tensors()
    assert naming.data_name(digits_arrays).startswith("py.digits_arrays-")
