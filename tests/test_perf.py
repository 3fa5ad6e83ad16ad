"""Performance paths must not change results: teacher cache, lockstep trials, the bench's output format.

Everything runs on CPU on the bundled digits data (seconds); timings are never asserted.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdsweep.common.digests import model_digest
from kdsweep.data.builtin import Augment
from kdsweep.data.dispatch import load_data
from kdsweep.methods.base import Method
from kdsweep.methods.registry import get_method
from kdsweep.models.factory import build_model
from kdsweep.training.devices import Accel
from kdsweep.training.loop import (
    Lockstep,
    Member,
    Schedule,
    train_student,
    train_students,
)
from kdsweep.training.teacher_outputs import TeacherCache

EPOCHS = 2
CPU = torch.device("cpu")


class EmbedKD(Method):
    """A test-only method that reads every tap: KD on logits + a regressed embedding (exercises feature caching)."""

    name = "test_embed_kd"
    summary = reference = "test"
    needs = frozenset({"logits", "feature", "embedding"})

    def __init__(self, hp, student, teacher, epochs):
        super().__init__(hp, student, teacher, epochs)
        self.head = nn.Linear(student.embedding[0], teacher.embedding[0])

    def forward(self, s, t, y, epoch):
        assert t.feature is not None and t.embedding is not None
        return {"ce": F.cross_entropy(s.logits, y), "hint": F.mse_loss(self.head(s.embedding), t.embedding),
                "kd": 0.1 * F.kl_div(F.log_softmax(s.logits, 1), F.log_softmax(t.logits, 1), reduction="batchmean",
                                     log_target=True)}


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(2)
    return load_data("digits", None, 600, 0, 0.2, CPU)


def make_teacher(data, seed=1):
    torch.manual_seed(seed)
    return build_model("digitnet_l", data.in_shape, data.num_classes).eval().requires_grad_(False)


def make_member(data, teacher, lr=0.05, method="vanilla_kd", student="digitnet_s", seed=0):
    torch.manual_seed(seed)
    s = build_model(student, data.in_shape, data.num_classes)
    cls = EmbedKD if method == "embed" else get_method(method)
    hp = {"temperature": 4.0, "alpha": 0.7} if method == "vanilla_kd" else {}
    m = cls(hp, s.shapes(data.in_shape), teacher.shapes(data.in_shape), EPOCHS)
    return Member(s, m, Schedule(EPOCHS, 32, lr), rng=(torch.get_rng_state(), None))  # the stream it would train alone on


def curve(result):
    return [(h.train["loss"], h.train["acc"], h.val_loss, h.val_acc) for h in result.history]


def assert_same(a, b, tol=1e-5):
    assert len(a) == len(b) == EPOCHS
    for ea, eb in zip(a, b):
        for x, y in zip(ea, eb):
            assert math.isclose(x, y, rel_tol=tol, abs_tol=tol), (a, b)


def train(data, teacher, member, cache=None, accel=None):
    return train_student(member.student, member.method, teacher, data, member.schedule, cache=cache, accel=accel)


@pytest.mark.parametrize("method", ["vanilla_kd", "embed"])
def test_cache_gives_the_same_losses(data, method):
    teacher = make_teacher(data)
    plain = curve(train(data, teacher, make_member(data, teacher, method=method)))
    cache = TeacherCache(64 * 2**20)
    first = curve(train(data, teacher, make_member(data, teacher, method=method), cache))
    assert cache.hits == 0 and cache.misses > 0
    second = curve(train(data, teacher, make_member(data, teacher, method=method), cache))
    assert cache.hits == cache.misses  # the second trial read every batch back
    assert_same(plain, first)
    assert_same(plain, second)


def test_cache_over_budget_keeps_logits_and_recomputes_features(data):
    teacher = make_teacher(data)
    plain = curve(train(data, teacher, make_member(data, teacher, method="embed")))
    cache = TeacherCache(1)  # one byte: nothing but the (always kept) logits
    for _ in range(2):
        got = curve(train(data, teacher, make_member(data, teacher, method="embed"), cache))
        assert_same(plain, got)
    steps = data.steps_per_epoch(32) * EPOCHS
    assert cache.used == steps * 32 * data.num_classes * 4  # logits only
    assert cache.hits == 0  # features were needed and never kept: every batch recomputed


def test_stale_entries_are_never_used(data):
    teacher = make_teacher(data)
    cache = TeacherCache(64 * 2**20)
    train(data, teacher, make_member(data, teacher), cache)
    misses = cache.misses

    with torch.no_grad():  # same object, edited weights: the key changes
        next(teacher.parameters()).add_(0.5)
    fresh = curve(train(data, teacher, make_member(data, teacher)))
    got = curve(train(data, teacher, make_member(data, teacher), cache))
    assert cache.hits == 0 and cache.misses == 2 * misses
    assert_same(fresh, got)

    other = load_data("digits", None, 600, 1, 0.2, CPU)  # another seed: split and augmentation stream differ
    train(other, teacher, make_member(other, teacher), cache)
    assert cache.hits == 0

    wide = make_teacher(data, seed=2)
    assert model_digest(wide) != model_digest(teacher)
    train(data, wide, make_member(data, wide), cache)
    assert cache.hits == 0


def test_an_output_edited_in_place_is_recomputed(data):
    teacher = make_teacher(data)

    class Clobber(get_method("vanilla_kd")):
        def forward(self, s, t, y, epoch):
            out = super().forward(s, t, y, epoch)
            t.logits.mul_(0)  # a badly behaved method
            return out

    def member():
        m = make_member(data, teacher)
        m.method.__class__ = Clobber
        return m

    plain = curve(train(data, teacher, member()))
    cache = TeacherCache(64 * 2**20)
    train(data, teacher, member(), cache)
    got = curve(train(data, teacher, member(), cache))
    assert cache.hits == 0  # every stored tensor's version moved on: all misses
    assert_same(plain, got)
    with pytest.raises(RuntimeError, match="modified the teacher's outputs in place"):
        train_students([member(), member()], teacher, data)  # lockstep members share `t`: refused, not silently wrong


def _unaugmented(data):
    """The same splits with augmentation off, as MNIST-1D's: a step's inputs are rows of the training split."""
    flat = copy.copy(data)
    flat.augment = Augment()
    return flat


def test_without_augmentation_the_teacher_runs_once_over_the_split(data):
    flat, teacher = _unaugmented(data), make_teacher(data)
    plain = curve(train(flat, teacher, make_member(flat, teacher, method="embed")))
    cache = TeacherCache(64 * 2**20)
    first = curve(train(flat, teacher, make_member(flat, teacher, method="embed"), cache))
    steps = flat.steps_per_epoch(32) * EPOCHS
    assert (cache.misses, cache.hits) == (1, steps)  # one pass over the split, then every step gathered its rows
    other = copy.copy(flat)
    other.stream_seed = 7  # another batch stream over the same split (a confirmation seed): the same table
    train(other, teacher, make_member(other, teacher, method="embed"), cache)
    assert (cache.misses, cache.hits) == (1, 2 * steps)
    shapes = teacher.shapes(flat.in_shape)
    row = math.prod(shapes.logits) + math.prod(shapes.feature) + math.prod(shapes.embedding)
    assert cache.used == flat.n_train * row * 4  # the split's logits, feature maps and embeddings, once
    assert cache.stats()["teacher_cache_tables"] == 1
    assert_same(plain, first)  # the same rows through the same teacher: float rounding at most


def test_a_gathered_step_equals_the_teacher_on_that_batch(data):
    from kdsweep.training.teacher_outputs import TeacherFeed

    flat, teacher = _unaugmented(data), make_teacher(data)
    feed = TeacherFeed(TeacherCache(64 * 2**20), teacher, flat, 32, frozenset({"feature", "embedding"}),
                       teacher.taps, "cpu")
    assert feed.whole
    with torch.no_grad():
        for step, (x, _, rows) in enumerate(flat.epoch(3, 32, index=True)):
            for got, want in zip(feed(step, x, rows), teacher.taps(x)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not TeacherFeed(TeacherCache(64 * 2**20), teacher, data, 32, frozenset(), teacher.taps, "cpu").whole
    assert not TeacherFeed(TeacherCache(64 * 2**20), teacher.train(), flat, 32, frozenset(), teacher.taps, "cpu").whole


def test_a_split_over_budget_is_computed_per_step(data):
    flat, teacher = _unaugmented(data), make_teacher(data)
    plain = curve(train(flat, teacher, make_member(flat, teacher, method="embed")))
    cache = TeacherCache(1)  # one byte: no table fits, so every step is computed and only its logits are kept
    got = curve(train(flat, teacher, make_member(flat, teacher, method="embed"), cache))
    assert cache.hits == 0 and cache.misses == flat.steps_per_epoch(32) * EPOCHS
    assert cache.used == cache.misses * 32 * flat.num_classes * 4
    assert cache.stats()["teacher_cache_tables"] == 0
    assert_same(plain, got)


@pytest.mark.parametrize("workers", [0, 2])
def test_lockstep_equals_sequential(data, workers):
    teacher = make_teacher(data)
    accel = Accel(cpu_workers=workers)
    specs = [dict(lr=0.05), dict(lr=0.2, method="embed"), dict(lr=0.1, student="mlp1200")]  # mlp1200: dropout 0.5
    alone = [curve(train(data, teacher, make_member(data, teacher, **kw), accel=accel)) for kw in specs]
    together = train_students([make_member(data, teacher, **kw) for kw in specs], teacher, data,
                              cache=TeacherCache(64 * 2**20), accel=accel)
    for a, r in zip(alone, together):
        assert r.stopped_by is None
        assert_same(a, curve(r))


def test_lockstep_stops_members_independently(data):
    teacher = make_teacher(data)

    class Stop(Exception):
        pass

    def stop_after_first(stats):
        raise Stop(f"epoch {stats.epoch}")

    members = [make_member(data, teacher, lr=0.05), make_member(data, teacher, lr=1e6), make_member(data, teacher, lr=0.1)]
    members[2].on_epoch = stop_after_first
    group = Lockstep(members, teacher, data, stop_on=(Stop,))
    while group.epoch():
        pass
    ok, diverged, stopped = group.results()
    assert ok.stopped_by is None and len(ok.history) == EPOCHS
    assert type(diverged.stopped_by).__name__ == "NonFiniteLoss" and diverged.history == []
    assert isinstance(stopped.stopped_by, Stop) and len(stopped.history) == 1


def stores(tmp_path) -> dict:
    # Absolute URIs: MLflow caches a store per URI string, so a relative one would follow the first test's cwd.
    (tmp_path / "mlruns").mkdir(exist_ok=True)
    return {"storage": f"sqlite:///{tmp_path}/mlruns/optuna.db", "tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db"}


def test_parallel_study_matches_sequential(tmp_path, monkeypatch):
    import mlflow

    from kdsweep.study.config import resolve
    from kdsweep.study.loop import run_study

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "cache"))
    common = {"dataset": "digits", "trials": 3, "epochs": 2, "teacher_epochs": 1, "device": "cpu", "pruner": "none",
              "data_size": 600, **stores(tmp_path)}
    seq = run_study(resolve("vanilla_kd", {**common, "study_name": "seq", "parallel": 1, "teacher_cache_mb": 0,
                                           "channels_last": False, "cpu_workers": 0}), say=lambda s: None)
    par = run_study(resolve("vanilla_kd", {**common, "study_name": "par", "parallel": 2}), say=lambda s: None)
    assert seq["complete"] == par["complete"] == 3

    import optuna

    def values(name):
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
        return {t.number: (t.params, t.value) for t in study.trials}

    s, p = values("seq"), values("par")
    assert s.keys() == p.keys()
    for n in s:
        assert s[n][0] == p[n][0]  # the same hyperparameters were asked for
        # and the same best val accuracy: all-off vs all-on differ by float rounding only (at most one of 60 val images)
        assert math.isclose(s[n][1], p[n][1], abs_tol=1.01 / 60)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("kdsweep/digits/digitnet_l->digitnet_s").experiment_id],
                              filter_string="tags.`kdsweep.study` = 'par' and tags.`kdsweep.role` = 'trial'")
    assert len(runs) == 3
    assert {r.data.tags["kdsweep.state"] for r in runs} == {"COMPLETE"}
    assert {r.data.params["parallel"] for r in runs} == {"2"}
    assert {r.data.params["processes"] for r in runs} == {"1"}  # started alone (--processes: tests/test_local_workers.py)


def test_bench_smoke_prints_the_table_and_last_line(capsys):
    from kdsweep.cli import main

    rc = main(["bench", "--device", "cpu", "--dataset", "digits", "--teacher", "digitnet_l", "--student", "digitnet_s",
               "--images", "128", "--epochs", "1", "--trials", "2", "--batch-size", "32", "--workers", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.strip().splitlines()
    assert re.fullmatch(r"speedup=\d+\.\d\d bound=\d+\.\d\d", lines[-1])
    for name in ("reference trial", "kdsweep trial", "kdsweep study, K=2"):
        row = next(line for line in lines if name in line)
        assert len(re.findall(r"\d+\.\d", row)) >= 3  # wall s, cpu s, images/s
    assert "teacher weights random" in out
    # Whether this run measured fused against threads or recalled the machine's answer: it moves the ratio.
    assert re.search(r"kdsweep study: 2 \w+ students: (fused|worker threads)", out), out
    speedup, bound = map(float, re.findall(r"\d+\.\d+", lines[-1]))
    assert 1 < bound < 2  # K=2: the bound lies between 1 and K
    # The last line is the ratio of the times it printed (no timing is judged, only the arithmetic).
    ref_k, study_s = map(float, re.search(r"= (\d+\.\d) s \(.*vs kdsweep study (\d+\.\d) s", out).groups())
    # Both times are printed to 0.1 s: the ratio must lie within what that rounding allows.
    assert (ref_k - 0.05) / (study_s + 0.05) - 0.01 <= speedup <= (ref_k + 0.05) / max(study_s - 0.05, 1e-3) + 0.01


def test_bench_rejects_bad_flags(capsys):
    from kdsweep.cli import main

    assert main(["bench", "--device", "cpu", "--trials", "0"]) == 2
    assert "--trials must be at least 1" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu", "--dataset", "mnist1d", "--images", "200"]) == 2
    err = capsys.readouterr().err
    assert "kdsweep bench times image pipelines; mnist1d's samples are 1x40 signals" in err and "Traceback" not in err


def test_pruning_in_lockstep_and_sequential_trials(tmp_path, monkeypatch):
    import mlflow
    import optuna

    from kdsweep.study import loop
    from kdsweep.study.config import resolve

    class PruneOneAndTwo(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number in (1, 2)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loop, "make_pruner", lambda cfg: PruneOneAndTwo())
    cfg = resolve("vanilla_kd", {"dataset": "digits", "trials": 3, "epochs": 2, "teacher_epochs": 1, "device": "cpu",
                                 "data_size": 300, "parallel": 2, "study_name": "pr", **stores(tmp_path)})
    summary = loop.run_study(cfg, say=lambda s: None)
    # trials 0+1 in lockstep (1 pruned there), then the one trial left of the 3, alone: 2 (pruned, sequential path)
    assert (summary["complete"], summary["pruned"], summary["failed"]) == (1, 2, 0)
    st = optuna.load_study(study_name="pr", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert [t.state.name for t in st.trials] == ["COMPLETE", "PRUNED", "PRUNED"]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    for t in st.trials[1:3]:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["kdsweep.state"] == "PRUNED" and run.data.tags["kdsweep.pruned_at_epoch"] == "0"
        assert run.info.status == "KILLED"


def test_teacher_digest_is_memoised_but_sees_in_place_edits(monkeypatch):
    import torch

    from kdsweep.common import digests
    from kdsweep.common.digests import model_digest
    from kdsweep.models.factory import build_model

    hashed = []
    real = digests._update
    monkeypatch.setattr(digests, "_update", lambda h, t: (hashed.append(t), real(h, t)))
    m = build_model("digitnet_l", (1, 8, 8), 10)
    first = model_digest(m)
    n = len(list(m.parameters())) + len(list(m.buffers()))
    assert len(hashed) == n  # every tensor hashed once...
    assert model_digest(m) == first and len(hashed) == n  # ...and not again: the memo served the second call
    with torch.no_grad():
        m.body[0].weight.mul_(1.5)  # an in-place edit: the cached digest of that tensor must not be reused
    assert model_digest(m) != first
    assert len(hashed) == n + 1 and hashed[-1] is m.body[0].weight  # only the edited tensor was hashed again
    twin = build_model("digitnet_l", (1, 8, 8), 10)
    twin.load_state_dict(m.state_dict())  # equal weights in other tensors: the same key
    assert model_digest(twin) == model_digest(m)


def test_a_group_of_several_methods_trials_equals_the_same_trials_one_by_one(tmp_path, monkeypatch):
    """A sweep deals the trials of its methods' studies into one lockstep group: each trial trains as it would
    alone (same parameters, losses, accuracies and checkpoint, up to float rounding), in its own study."""
    import mlflow
    import optuna

    from kdsweep.study.config import resolve
    from kdsweep.study.loop import run_studies

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "cache"))
    common = {"dataset": "digits", "trials": 2, "epochs": 2, "teacher_epochs": 1, "device": "cpu", "pruner": "none",
              "data_size": 600, "channels_last": False, **stores(tmp_path)}
    methods = ("ce", "vanilla_kd", "pkt")
    one_by_one = run_studies([resolve(m, {**common, "study_name": f"{m}-alone", "parallel": 1}) for m in methods],
                             say=lambda s: None)
    grouped = run_studies([resolve(m, {**common, "study_name": f"{m}-grouped", "parallel": 6}) for m in methods],
                          say=lambda s: None)
    assert [s["complete"] for s in one_by_one] == [s["complete"] for s in grouped] == [2, 2, 2]

    client = mlflow.tracking.MlflowClient(common["tracking_uri"])
    exp = client.get_experiment_by_name("kdsweep/digits/digitnet_l->digitnet_s").experiment_id

    def trials(name):
        study = optuna.load_study(study_name=name, storage=common["storage"])
        runs = {r.data.tags["kdsweep.trial"]: r for r in client.search_runs(
            [exp], filter_string=f"tags.`kdsweep.study` = '{name}' and tags.`kdsweep.role` = 'trial'")}
        return {t.number: (t, runs[str(t.number)]) for t in study.trials}

    for m in methods:
        alone, together = trials(f"{m}-alone"), trials(f"{m}-grouped")
        assert alone.keys() == together.keys() == {0, 1}
        for n in alone:
            (ta, ra), (tg, rg) = alone[n], together[n]
            assert ta.params == tg.params
            assert math.isclose(ta.value, tg.value, abs_tol=1e-6)
            assert math.isclose(ta.user_attrs["test_acc"], tg.user_attrs["test_acc"], abs_tol=1e-6)
            losses = [[x.value for x in client.get_metric_history(r.info.run_id, "train_loss")] for r in (ra, rg)]
            assert len(losses[0]) == 2 and torch.allclose(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-5)
            ckpts = [torch.load(mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="checkpoint/student.pt",
                                                                    tracking_uri=common["tracking_uri"]), weights_only=False)
                     for r in (ra, rg)]
            for k, v in ckpts[0]["student"].items():
                assert torch.allclose(v, ckpts[1]["student"][k], atol=1e-5), (m, n, k)
