"""Issue 12, parts 1, 2 and 5 (models): the user's own teacher and student, torchvision's, plain state_dict teachers.

The user's models live in tests/kd_user_models.py, plain nn.Modules named as `kd_user_models:factory`.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from kdsweep.common.digests import model_digest
from kdsweep.common.errors import UserError
from kdsweep.models import specs
from kdsweep.models.factory import build_model
from kdsweep.models.taps import Tapped
from kdsweep.training import checkpoint

HERE = Path(__file__).parent
DIGITS = ["--dataset", "digits", "--trials", "1", "--epochs", "1", "--teacher-epochs", "1"]
PAIR = ["--teacher", "kd_user_models:teacher", "--student", "kd_user_models:student"]
TV = ["--dataset", "synthetic", "--data-size", "100", "--val-fraction", "0.2", "--batch-size", "50", "--trials", "1",
      "--epochs", "1", "--teacher-epochs", "1", "--teacher", "torchvision:resnet18", "--student", "torchvision:mobilenet_v3_small"]


@pytest.fixture(autouse=True)
def user_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))  # as a user's own package on PYTHONPATH


def _client():
    return MlflowClient(f"sqlite:///{os.getcwd()}/mlruns/mlflow.db")


def _parents(experiment: str):
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`kdsweep.role` = 'study'")


def _nothing_written(workdir):
    db = workdir / "mlruns" / "optuna.db"
    if db.exists():
        assert optuna.get_all_study_names(f"sqlite:///{db}") == []
    if (workdir / "mlruns" / "mlflow.db").exists():
        client = _client()
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdsweep: error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------- acceptance: studies


def test_a_study_with_the_users_own_module_pair(kdsweep, workdir):
    code, out, err = kdsweep("study", "attention", *DIGITS, *PAIR)
    assert code == 0, err
    (parent,) = _parents("kdsweep/digits/kd_user_models:teacher->kd_user_models:student")
    p = parent.data.params
    assert (p["teacher"], p["student"]) == ("kd_user_models:teacher", "kd_user_models:student")
    assert (p["teacher_feature"], p["teacher_embedding"], p["student_feature"], p["student_embedding"]) == ("body", "head", "body", "head")
    import kd_user_models

    assert int(p["student_params"]) == sum(t.numel() for t in kd_user_models.student(10).parameters())
    assert int(p["teacher_params"]) == sum(t.numel() for t in kd_user_models.teacher(10, (1, 8, 8)).parameters())
    assert p["teacher_file_sha256"] == hashlib.sha256(Path(p["teacher_checkpoint"]).read_bytes()).hexdigest()

    # Another layer is another computation: the study refuses it (before training anything) rather than mix them.
    code, _, err = kdsweep("study", "attention", *DIGITS, *PAIR, "--student-feature", "body.2")
    assert code == 2 and "(student_feature: None -> body.2)" in _one_line(err)

    # The student checkpoint kdsweep wrote loads into the user's plain module: no wrapper prefix.
    client = _client()
    (trial,) = client.search_runs([parent.info.experiment_id], "tags.`kdsweep.role` = 'trial'")
    path = client.download_artifacts(trial.info.run_id, "checkpoint/student.pt", str(workdir))
    payload = torch.load(path, weights_only=True)
    plain = kd_user_models.student(10)
    plain.load_state_dict(payload["student"])  # strict: every key fits
    assert payload["arch"] == "kd_user_models:student"



@pytest.mark.slow  # a torchvision pair studied end to end; its default taps are unit-tested
def test_torchvision_pair_with_feature_methods_on_hook_taps(kdsweep, workdir):
    code, out, err = kdsweep("sweep", "--methods", "fitnet,attention", *TV)
    assert code == 0, err
    assert "fitnet=" in out and "attention=" in out
    parents = _parents("kdsweep/synthetic/torchvision:resnet18->torchvision:mobilenet_v3_small")
    assert sorted(r.data.tags["kdsweep.method"] for r in parents) == ["attention", "fitnet"]
    for r in parents:
        p = r.data.params
        assert (p["teacher_feature"], p["teacher_embedding"]) == ("layer4", "fc")
        assert (p["student_feature"], p["student_embedding"]) == ("features", "classifier.3")
        assert int(p["teacher_params"]) > int(p["student_params"]) > 0
        assert len(p["teacher_sha256"]) == 64 and len(p["teacher_file_sha256"]) == 64
        # Readable names: the spec's ':' is replaced, and the name keeps its hash (sanitize stays injective).
        assert r.data.tags["kdsweep.study"].startswith(f"{r.data.tags['kdsweep.method']}-synthetic-torchvision_resnet18-"
                                                       f"torchvision_mobilenet_v3_small-s0-")


# ---------------------------------------------------------------------------------------------- teacher checkpoints


def test_a_plain_state_dict_teacher_loads_and_is_the_study_identity(kdsweep, workdir):
    import kd_user_models

    torch.manual_seed(1)
    teacher = kd_user_models.teacher(10, (1, 8, 8))
    torch.save(teacher.state_dict(), workdir / "mine.pt")
    code, out, err = kdsweep("study", "vanilla_kd", *DIGITS, *PAIR, "--teacher-checkpoint", "mine.pt",
                             "--accept-teacher")  # random weights: the file's identity is what this test asks
    assert code == 0, err
    assert "carries no checksum" not in out + err  # a state_dict never has one: no note about it
    (parent,) = _parents("kdsweep/digits/kd_user_models:teacher->kd_user_models:student")
    p = parent.data.params
    assert p["teacher_file_sha256"] == hashlib.sha256((workdir / "mine.pt").read_bytes()).hexdigest()
    assert p["teacher_sha256"] == model_digest(teacher)
    study = optuna.load_study(study_name=parent.data.tags["kdsweep.study"], storage=f"sqlite:///{workdir}/mlruns/optuna.db")
    assert study.user_attrs["kdsweep_teacher"]["sha256"] == model_digest(teacher)


def test_state_dict_wrappers_and_prefixes_load(tmp_path, user_modules):
    import kd_user_models

    torch.manual_seed(2)
    teacher = kd_user_models.teacher(10, (1, 8, 8))
    state = teacher.state_dict()
    for n, payload in enumerate([{"state_dict": state, "epoch": 3}, {"model": {f"module.{k}": v for k, v in state.items()}},
                                 {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}]):
        torch.save(payload, tmp_path / f"t{n}.pt")
        model, info = checkpoint.load_model(tmp_path / f"t{n}.pt", "kd_user_models:teacher", (1, 8, 8), 10)
        assert info["plain"] and model_digest(model) == model_digest(teacher)
        assert isinstance(model, Tapped) and model.feature_path == "body"


def test_a_pickled_module_is_refused(kdsweep, workdir):
    import kd_user_models

    torch.save(kd_user_models.teacher(10, (1, 8, 8)), workdir / "whole.pt")  # the whole object: code, not weights
    code, _, err = kdsweep("study", "vanilla_kd", *DIGITS, *PAIR, "--teacher-checkpoint", "whole.pt")
    assert code == 2
    line = _one_line(err)
    assert "whole.pt is unsafe" in line and "pickled Python objects (kd_user_models.ConvClassifier)" in line and "state_dict()" in line
    _nothing_written(workdir)


def _teacher_file(workdir, factory: str, *args) -> str:
    import kd_user_models

    torch.save(getattr(kd_user_models, factory)(*args).state_dict(), workdir / "t.pt")
    return "t.pt"


@pytest.mark.parametrize("factory, args, expect", [
    ("student", (10,), "does not fit kd_user_models:teacher: body.0.weight has shape (4, 1, 3, 3) in the file, "
                       "(16, 1, 3, 3) in the model built for 10 classes (9 shapes differ)"),
    ("teacher", (7, (1, 8, 8)), "head.weight has shape (7, 16) in the file, (10, 16) in the model built for 10 classes "
                                "(2 shapes differ)"),  # a teacher of another class count than the data's
    ("Flat", (10,), "does not fit kd_user_models:teacher: first missing key 'body.0.weight' (10 missing); "
                    "first unexpected key 'net.1.weight' (4 unexpected)"),
])
def test_a_checkpoint_that_does_not_fit_is_one_line(kdsweep, workdir, factory, args, expect):
    path = _teacher_file(workdir, factory, *args)
    code, _, err = kdsweep("study", "vanilla_kd", *DIGITS, *PAIR, "--teacher-checkpoint", path)
    assert code == 2
    assert expect in _one_line(err)
    _nothing_written(workdir)


# ---------------------------------------------------------------------------------------------- bad model inputs


@pytest.mark.parametrize("method, extra, expect", [
    ("vanilla_kd", ["--student", "no_such_module_kd:make"], "no_such_module_kd:make: cannot import module 'no_such_module_kd'"),
    ("vanilla_kd", ["--student", "kd_user_models:nope"], "module 'kd_user_models' has no attribute 'nope'"),
    ("vanilla_kd", ["--student", "kd_user_models:NOT_CALLABLE"], "'NOT_CALLABLE' is a Tensor, not a callable"),
    ("vanilla_kd", ["--student", "kd_user_models:raises"], "kd_user_models:raises: building the model failed: "
                                                          "RuntimeError: out of coffee"),
    ("vanilla_kd", ["--student", "kd_user_models:not_a_module"], "the factory returned a int, not an nn.Module"),
    ("vanilla_kd", ["--student", "kd_user_models:two_outputs"], "returns a tuple, not a tensor of logits"),
    ("vanilla_kd", ["--student", "kd_user_models:scalar_output"], "output has shape (2,) for a batch of 2, not "
                                                                 "(batch, classes) = (2, 10)"),
    ("vanilla_kd", ["--teacher", "kd_user_models:seven_classes"], "kd_user_models:seven_classes: the model's output has "
                                                                 "shape (2, 7) for a batch of 2, not (batch, classes) = "
                                                                 "(2, 10): the data has 10 classes"),
    ("attention", [*PAIR, "--student-feature", "body.9"], "kd_user_models:student: no module at feature path 'body.9'"),
    ("rkd", [*PAIR, "--teacher-embedding", "neck"], "no module at embedding path 'neck' (its top-level modules: body, pool, head"),
    ("fitnet", ["--teacher", "kd_user_models:teacher", "--student", "kd_user_models:Flat"],
     "fitnet needs spatial feature maps from both models"),
    ("rkd", ["--teacher", "kd_user_models:teacher", "--student", "kd_user_models:AllConv"],
     "rkd needs an embedding (the input of a final nn.Linear) of the student, and kd_user_models:AllConv has none found "
     "automatically: name its module with --student-embedding PATH"),
    ("vanilla_kd", ["--teacher", "torchvision:resnet1000"], "torchvision has no model 'resnet1000'"),
    ("vanilla_kd", ["--teacher", "torchvision:resnet18"], "torchvision:resnet18: a forward pass on inputs of shape "
                                                          "(2, 1, 8, 8) failed: RuntimeError"),
    ("vanilla_kd", ["--student", "my models:make"], "'my models:make' is not a model spec"),
    ("vanilla_kd", ["--student", "resnet1000"], "unknown architecture 'resnet1000'; known: resnet18"),
])
def test_bad_model_input_is_one_line_exit_2_nothing_written(kdsweep, workdir, method, extra, expect):
    code, out, err = kdsweep("study", method, *DIGITS, *extra)
    assert code == 2, out + err
    line = _one_line(err)
    assert expect in line, line
    assert "Traceback" not in err
    _nothing_written(workdir)


def test_a_module_that_fails_on_import_is_one_line(kdsweep, workdir):
    (workdir / "kd_broken_mod.py").write_text("import torch\nraise ValueError('half-written file')\n")
    code, _, err = kdsweep("study", "vanilla_kd", *DIGITS, "--student", "kd_broken_mod:make")
    assert code == 2
    assert "kd_broken_mod:make: importing module 'kd_broken_mod' failed: ValueError: half-written file" in _one_line(err)
    _nothing_written(workdir)


def test_timm_without_timm_is_one_line(kdsweep, workdir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    code, _, err = kdsweep("study", "vanilla_kd", *DIGITS, "--student", "timm:resnet18")
    assert code == 2
    assert "timm:resnet18 needs timm, which is not installed (pip install 'kdsweep[timm]'" in _one_line(err)
    _nothing_written(workdir)


def test_timm_models_build_when_timm_is_installed():
    pytest.importorskip("timm")
    m = build_model("timm:resnet18", (3, 32, 32), 10)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10) and m.feature_path and m.embedding_path


# ---------------------------------------------------------------------------------------------- the hooks themselves


def test_default_taps_of_torchvision_models():
    t = build_model("torchvision:resnet18", (3, 32, 32), 10)
    s = build_model("torchvision:mobilenet_v3_small", (3, 32, 32), 10)
    assert (t.feature_path, t.embedding_path) == ("layer4", "fc")
    assert (s.feature_path, s.embedding_path) == ("features", "classifier.3")  # not the SE blocks' pools, not avgpool
    x = torch.randn(3, 3, 64, 64)
    t.eval()
    o = t.taps(x)
    assert o.feature.shape == (3, 512, 2, 2) and o.embedding.shape == (3, 512)
    assert torch.equal(o.logits, t(x)) and torch.allclose(t.inner.fc(o.embedding), o.logits)
    assert list(t.state_dict()) == list(t.inner.state_dict())  # no "inner." prefix in checkpoints


def test_taps_are_per_call_under_functional_call_and_vmap():
    from torch.func import functional_call, stack_module_state, vmap

    torch.manual_seed(0)
    models = [build_model("kd_user_models:student", (1, 8, 8), 10).eval() for _ in range(3)]
    params, buffers = stack_module_state(models)

    def taps(p, b, x):
        with torch.nn.utils.stateless._reparametrize_module(models[0], {**p, **b}):
            return tuple(models[0].taps(x))

    x = torch.randn(5, 1, 8, 8)
    logits, feature, embedding = vmap(taps, in_dims=(0, 0, None))(params, buffers, x)
    for i, m in enumerate(models):
        ref = m.taps(x)
        assert torch.allclose(logits[i], ref.logits, atol=1e-6) and torch.allclose(feature[i], ref.feature, atol=1e-6)
        assert torch.allclose(embedding[i], ref.embedding, atol=1e-6)
    p0 = {k: v[1] for k, v in params.items()}
    assert torch.allclose(functional_call(models[0], p0, (x,)), models[1](x), atol=1e-6)
    assert models[0]._slot() is None  # nothing outlives a call


def test_a_copy_reads_its_own_layers():
    m = build_model("kd_user_models:student", (1, 8, 8), 10)
    twin = copy.deepcopy(m)
    with torch.no_grad():
        twin.inner.head.weight.zero_()
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(twin.taps(x).embedding, m.taps(x).embedding)
    assert twin.taps(x).logits.abs().sum() != m.taps(x).logits.abs().sum()


def test_overriding_a_builtin_nets_taps_keeps_its_identity_and_weights():
    torch.manual_seed(0)
    plain = build_model("digitnet_l", (1, 8, 8), 10)
    torch.manual_seed(0)
    hooked = build_model("digitnet_l", (1, 8, 8), 10, feature="body.3")
    assert model_digest(hooked) == model_digest(plain)  # a cached teacher verifies under other taps
    assert hooked.shapes((1, 8, 8)).feature == (64, 8, 8) and plain.shapes((1, 8, 8)).feature == (128, 4, 4)
    hooked.load_state_dict(plain.state_dict())


def test_a_registered_model_is_a_name_in_a_study_config():
    import kd_user_models

    from kdsweep.study.config import StudyConfig

    name = specs.register("my_student", kd_user_models.student)
    try:
        cfg = StudyConfig(method="vanilla_kd", name="x", dataset="digits", student=name)
        assert cfg.student == "my_student" and build_model(name, (1, 8, 8), 10)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
        specs.register("my_teacher", kd_user_models.teacher(10, (1, 8, 8)))  # an instance: copied per build
        a, b = build_model("my_teacher", (1, 8, 8), 10), build_model("my_teacher", (1, 8, 8), 10)
        assert a.inner is not b.inner and model_digest(a) == model_digest(b)
        with pytest.raises(UserError, match="cannot register"):
            specs.register("resnet18", kd_user_models.student)
    finally:
        specs.unregister("my_student")
        specs.unregister("my_teacher")


def test_a_study_file_names_the_layers(kdsweep, workdir):
    (workdir / "mine.toml").write_text('method = "attention"\n[defaults]\nteacher = "kd_user_models:teacher"\n'
                                       'student = "kd_user_models:student"\nstudent_feature = "body.7"\n')
    code, _, err = kdsweep("study", "mine.toml", *DIGITS)
    assert code == 2 and "kd_user_models:student: no module at feature path 'body.7'" in _one_line(err)
    _nothing_written(workdir)


def test_the_shared_teacher_cache_keeps_other_layers_apart():
    from kdsweep.data.dispatch import load_data
    from kdsweep.training.teacher_outputs import TeacherCache, TeacherFeed

    data = load_data("digits", None, 200, 0, 0.2, torch.device("cpu"))
    cache = TeacherCache(1 << 24)
    keys = set()
    for feature in ("body.0", "body.3"):
        torch.manual_seed(0)
        t = build_model("kd_user_models:teacher", (1, 8, 8), 10, feature=feature).eval()
        keys.add(TeacherFeed(cache, t, data, 32, frozenset({"feature"}), t.taps, "cpu").key)
    assert len(keys) == 2


@pytest.mark.slow  # torchvision models on an image folder: the folder source (test_sources) and the taps (unit) stay in the default tier
def test_torchvision_pair_on_an_image_folder_of_generated_pngs(kdsweep, workdir):
    """Acceptance 1's last case: the torchvision pair, hook taps and all, on an ImageFolder of PNGs."""
    from test_sources import make_folder

    folder = make_folder(workdir / "pngs", classes=3, n=20, size=32)
    code, out, err = kdsweep("study", "fitnet", "--dataset", "imagefolder:pngs", "--teacher", "torchvision:resnet18",
                             "--student", "torchvision:mobilenet_v3_small", "--trials", "1", "--epochs", "1",
                             "--teacher-epochs", "1", "--batch-size", "16", "--val-fraction", "0.2", "-q")
    assert code == 0, err
    from kdsweep.data.sources import name_tag

    (parent,) = _parents(f"kdsweep/{name_tag(f'imagefolder:{folder}')}/torchvision:resnet18->torchvision:mobilenet_v3_small")
    p = parent.data.params
    assert (p["teacher_feature"], p["student_feature"], p["in_shape"], p["data_files"]) == ("layer4", "features", "3x32x32", "78")
    assert "1 complete" in out or "1 pruned" in out
