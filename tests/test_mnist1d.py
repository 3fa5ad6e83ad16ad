"""MNIST-1D: the package's own data, 1D taps, the optimiser choice, a tiny study through the CLI."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from kdsweep.common.errors import UserError
from kdsweep.common.space import LR_RANGES
from kdsweep.data import builtin
from kdsweep.data.dispatch import get_dataset, load_data
from kdsweep.methods.registry import get_method
from kdsweep.models.factory import build_model
from kdsweep.models.zoo import count_params
from kdsweep.study.config import StudyConfig, resolve
from kdsweep.study.pairs import pair_problem
from kdsweep.training.loop import Schedule, make_optimizer, train_student

CPU = torch.device("cpu")
STUDIES = Path(__file__).resolve().parents[1] / "studies"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One generated MNIST-1D per test module (the generator takes ~2 s)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(autouse=True)
def _data_env(data_dir, monkeypatch):
    monkeypatch.setenv("KDSWEEP_DATA", str(data_dir))


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def test_mnist1d_is_the_packages_dataset_generated_once_and_deterministic(data_dir, monkeypatch):
    from mnist1d.data import get_dataset_args, make_dataset

    ref = make_dataset(get_dataset_args())  # the package itself, default arguments
    np.random.seed(123)
    expected_draw = np.random.rand()
    np.random.seed(123)
    raw = get_dataset("mnist1d").load(data_dir, None)
    assert np.random.rand() == expected_draw  # generating moved no caller's numpy stream
    assert raw.train_x.shape == (4000, 1, 40) and raw.test_x.shape == (1000, 1, 40)
    assert raw.train_x.dtype == torch.float32 and raw.num_classes == 10
    assert set(raw.train_y.tolist()) == set(range(10)) == set(raw.test_y.tolist())
    assert torch.equal(raw.train_y, torch.as_tensor(ref["y"])) and torch.equal(raw.test_y, torch.as_tensor(ref["y_test"]))
    assert _digest(raw.train_x[:16, 0].numpy()) == _digest(ref["x"][:16])
    assert _digest(raw.test_x[:16, 0].numpy()) == _digest(ref["x_test"][:16])

    # Cached: a second load generates nothing and gives the very same tensors.
    cached = list((data_dir / "mnist1d").glob("mnist1d-*.pt"))
    assert len(cached) == 1
    monkeypatch.setattr(builtin, "mnist1d_generate", lambda: pytest.fail("generated again despite the cache"))
    again = get_dataset("mnist1d").load(data_dir, None)
    assert torch.equal(again.train_x, raw.train_x) and torch.equal(again.test_y, raw.test_y)
    monkeypatch.undo()

    # A damaged cache file is generated again, not trusted.
    damaged = data_dir / "damaged"
    (damaged / "mnist1d").mkdir(parents=True)
    (damaged / "mnist1d" / cached[0].name).write_bytes(b"not a torch file")
    assert torch.equal(get_dataset("mnist1d").load(damaged, None).train_x, raw.train_x)


def test_mnist1d_splits_are_seeded_float_and_unaugmented(data_dir):
    a = load_data("mnist1d", data_dir, None, seed=0, val_fraction=0.1, device=CPU)
    b = load_data("mnist1d", data_dir, None, seed=1, val_fraction=0.1, device=CPU)
    assert a.in_shape == (1, 40) and a.n_train == 3600 and len(a.val_y) == 400 and len(a.test_y) == 1000
    assert not torch.equal(a.val_x, b.val_x) and torch.equal(a.test_x, b.test_x)
    assert torch.equal(a.normalize(a.val_x), a.val_x)  # the generator already standardised the signals
    x, y = next(iter(a.epoch(0, 100)))
    assert x.shape == (100, 1, 40)
    rows = {tuple(r) for r in a.train_x[:, 0].tolist()}
    assert all(tuple(r) in rows for r in x[:, 0].tolist())  # batches are training rows as they are: no augmentation


def test_1d_models_expose_taps_and_refuse_images():
    shapes = {a: build_model(a, (1, 40), 10).shapes((1, 40)) for a in ("cnn1d", "cnn1d_s", "mlp100")}
    assert (shapes["cnn1d"].feature, shapes["cnn1d"].embedding, shapes["cnn1d"].logits) == ((25, 1, 5), (125,), (10,))
    assert (shapes["cnn1d_s"].feature, shapes["cnn1d_s"].embedding) == ((8, 1, 5), (40,))
    assert (shapes["mlp100"].feature, shapes["mlp100"].embedding) == ((100,), (100,))
    assert shapes["cnn1d"].spatial and not shapes["mlp100"].spatial
    # The paper's sizes: CNN 150 + 1900 + 1900 + 1260 weights, MLP 40-100-100-10.
    assert count_params(build_model("cnn1d", (1, 40), 10)) == 5210
    assert count_params(build_model("mlp100", (1, 40), 10)) == 15210
    net = build_model("cnn1d", (1, 40), 10).eval()
    x = torch.randn(3, 1, 40)
    assert torch.allclose(net(x), net.taps(x).logits)
    for kw, word in (({"student": "digitnet_s"}, "images"), ({"dataset": "digits", "teacher": "cnn1d"}, "signals")):
        with pytest.raises(UserError, match=word):
            StudyConfig(**{"method": "ce", "name": "ce", "dataset": "mnist1d", **kw})


def test_feature_methods_serve_the_1d_cnn_pair_and_refuse_the_mlp_in_one_line(data_dir):
    for method in ("fitnet", "attention", "feature_mse"):
        assert pair_problem(StudyConfig(method=method, name=method, dataset="mnist1d", student="cnn1d_s")) is None
        why = pair_problem(StudyConfig(method=method, name=method, dataset="mnist1d"))
        assert why and "\n" not in why and "cnn1d -> mlp100" in why
    assert pair_problem(StudyConfig(method="sp", name="sp", dataset="mnist1d")) is None
    # And they train: a few steps of each on the CNN -> small CNN pair, through the trainer.
    data = load_data("mnist1d", data_dir, 240, seed=0, val_fraction=0.25, device=CPU)
    torch.manual_seed(0)
    teacher = build_model("cnn1d", data.in_shape, 10).eval().requires_grad_(False)
    for method, term in (("fitnet", "hint"), ("attention", "at"), ("feature_mse", "feat")):
        student = build_model("cnn1d_s", data.in_shape, 10)
        m = get_method(method)({k: v.default for k, v in get_method(method).space.items()},
                               student.shapes(data.in_shape), teacher.shapes(data.in_shape), 1)
        result = train_student(student, m, teacher, data, Schedule(1, 60, 1e-3, optimizer="adam"))
        train = result.history[0].train
        assert term in train and all(math.isfinite(v) for v in train.values()), (method, train)


def test_optimizer_is_part_of_the_budget_and_sets_the_lr_range(tmp_path):
    m1d = StudyConfig(method="ce", name="ce", dataset="mnist1d")
    assert (m1d.optimizer, m1d.weight_decay, m1d.batch_size) == ("adam", 0.0, 100)
    assert m1d.budget_tag == "e30-b100"  # the dataset's own recipe: no suffix
    assert StudyConfig(method="ce", name="ce", dataset="mnist1d", optimizer="sgd").budget_tag == "e30-b100-sgd"
    digits = StudyConfig(method="ce", name="ce", dataset="digits")
    assert (digits.optimizer, digits.weight_decay, digits.budget_tag) == ("sgd", 5e-4, "e10-b32")  # names unchanged
    adamw = StudyConfig(method="ce", name="ce", dataset="digits", optimizer="adamw")
    assert adamw.budget_tag == "e10-b32-adamw" and adamw.fingerprint()["optimizer"] == "adamw"
    with pytest.raises(UserError, match="unknown optimizer"):
        StudyConfig(method="ce", name="ce", dataset="digits", optimizer="lbfgs")
    # The lr range follows the optimiser, from a flag, a study file or the dataset.
    assert resolve("ce", {"dataset": "digits"}).space["lr"] == LR_RANGES["sgd"]
    assert resolve("ce", {"dataset": "digits", "optimizer": "adam"}).space["lr"] == LR_RANGES["adam"]
    for shipped in STUDIES.glob("*.toml"):  # the shipped study files leave the lr range to the optimiser
        assert resolve(str(shipped), {"dataset": "mnist1d"}).space["lr"] == LR_RANGES["adam"]
    (tmp_path / "mine.toml").write_text('method = "ce"\n[defaults]\noptimizer = "adamw"\ndataset = "digits"\n')
    cfg = resolve(str(tmp_path / "mine.toml"), {})
    assert cfg.optimizer == "adamw" and cfg.space["lr"] == LR_RANGES["adamw"]
    # What each choice builds.
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert make_optimizer(params, Schedule(optimizer="sgd"), 10).kind == "sgd"
    adam = make_optimizer(params, Schedule(optimizer="adam", momentum=0.8, weight_decay=0.0), 10)
    assert (adam.kind, adam.momentum, adam.weight_decay) == ("adam", 0.8, 0.0)
    assert make_optimizer(params, Schedule(optimizer="adamw"), 10).kind == "adamw"


def _trial_runs(study: str):
    client = MlflowClient(f"sqlite:///{os.getcwd()}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("kdsweep/mnist1d/cnn1d->mlp100")
    return client.search_runs([exp.experiment_id], f"tags.`kdsweep.role` = 'trial' and tags.`kdsweep.study` = '{study}'")


def test_tiny_mnist1d_study_resumes_and_logs_its_optimizer(kdsweep):
    storage = f"sqlite:///{os.getcwd()}/mlruns/optuna.db"
    name = "vanilla_kd-mnist1d-cnn1d-mlp100-s0-e2-b100-n300-te2"
    args = ("study", "vanilla_kd", "--dataset", "mnist1d", "--epochs", 2, "--data-size", 300, "--teacher-epochs", 2,
            "--device", "cpu")
    code, out, err = kdsweep(*args, "--trials", 2)
    assert code == 0, err
    assert f"study {name}:" in out and "best trial" in out
    code, _, err = kdsweep(*args, "--trials", 3)  # the same Adam study, resumed
    assert code == 0, err
    runs = _trial_runs(name)
    assert len(runs) == 3 and len(optuna.load_study(study_name=name, storage=storage).trials) == 3
    for run in runs:
        p = run.data.params
        assert (p["optimizer"], float(p["weight_decay"]), p["batch_size"]) == ("adam", 0.0, "100")
        assert LR_RANGES["adam"].low <= float(p["lr"]) <= LR_RANGES["adam"].high
    # The teacher trained with the dataset's recipe too, and says so.
    client = MlflowClient(f"sqlite:///{os.getcwd()}/mlruns/mlflow.db")
    teacher = client.search_runs([client.get_experiment_by_name("teachers").experiment_id])[0]
    assert teacher.data.params["optimizer"] == "adam" and teacher.data.params["arch"] == "cnn1d"

    # Another optimiser computes something else: another study, never a conflict with this one.
    code, out, err = kdsweep(*args, "--trials", 1, "--optimizer", "adamw")
    assert code == 0, err
    assert set(optuna.get_all_study_names(storage)) == {name, name.replace("-b100-", "-b100-adamw-")}
    assert [r.data.params["optimizer"] for r in _trial_runs(name.replace("-b100-", "-b100-adamw-"))] == ["adamw"]
