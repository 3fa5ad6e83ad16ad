"""Integrity of what a study compares: one teacher, one split, an undamaged file, no teacher run left RUNNING.

Each test replays the attack that found the gap (issue 9).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from reliability_helpers import cli_env, start_cli, wait_for

from kdsweep.common.digests import model_digest
from kdsweep.common.errors import UserError
from kdsweep.data.dispatch import load_data
from kdsweep.models.factory import build_model
from kdsweep.study import fixed_inputs
from kdsweep.study.config import StudyConfig
from kdsweep.training import checkpoint

KD = ["study", "vanilla_kd", "--dataset", "digits", "--data-size", "300", "--epochs", "2", "--pruner", "none",
      "--device", "cpu", "--teacher-epochs", "2"]


def _stores(tmp: Path) -> list[str]:
    (tmp / "mlruns").mkdir(exist_ok=True)
    return ["--storage", f"sqlite:///{tmp / 'mlruns' / 'optuna.db'}", "--tracking-uri", f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"]


def _trials(tmp: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp / 'mlruns' / 'optuna.db'}").get_trials()


def _random_teacher(path: Path, seed: int, sha: bool = True, meta: dict | None = None) -> Path:
    """An untrained digitnet_l teacher file (as kdsweep writes it, or as older kdsweep did with sha=False)."""
    torch.manual_seed(seed)
    model = build_model("digitnet_l", (1, 8, 8), 10)
    return checkpoint.save(path, "digitnet_l", (1, 8, 8), 10, {"student": model.state_dict()}, meta or {"val_acc": 0.5},
                           sha256=model_digest(model) if sha else None)


def _zero_a_weight(path: Path, n: int = 256) -> None:
    """Write zero bytes into the largest tensor of a checkpoint, in place: the zip structure stays intact."""
    with zipfile.ZipFile(path) as z:
        entry = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(entry.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(entry.header_offset + 30 + name_len + extra_len)
        f.write(bytes(min(n, entry.file_size)))


def _cfg(**kw) -> StudyConfig:
    return StudyConfig(method="vanilla_kd", name="t", dataset="digits", data_size=300, device="cpu", teacher_epochs=1, **kw)


@pytest.fixture
def digits():
    return load_data("digits", None, 300, 0, 0.1, torch.device("cpu"))


@pytest.fixture
def tracker(tmp_path):
    from kdsweep.tracking.tracker import Tracker

    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")


# --------------------------------------------------------------------------- one teacher per study


def test_resume_with_another_teacher_checkpoint_is_refused_before_any_training(workdir, kdsweep):
    stores = _stores(workdir)
    code, out, err = kdsweep(*KD, "--trials", "1", "--study-name", "one", *stores)
    assert code == 0, out + err
    other = _random_teacher(workdir / "other.pt", seed=7)

    code, out, err = kdsweep(*KD, "--trials", "2", "--study-name", "one", "--teacher-checkpoint", other, *stores,
                             "--accept-teacher")  # random weights: which teacher is what this test asks
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "its teacher is" in lines[0] and str(other) in lines[0], err
    recorded = _trials(workdir, "one")
    assert len(recorded) == 1  # no new trial
    assert model_digest(checkpoint.load_model(other)[0])[:12] in lines[0]


def test_changed_teacher_settings_are_refused_before_a_teacher_is_trained(workdir, kdsweep, teacher_cache):
    stores = _stores(workdir)
    code, out, err = kdsweep(*KD, "--trials", "1", "--study-name", "te", *stores)
    assert code == 0, out + err
    code, out, err = kdsweep(*[a if a != "2" else "3" for a in KD], "--trials", "1", "--study-name", "te", *stores)
    assert code == 2 and "teacher_epochs: 2 -> 3" in err
    assert "training one now" not in out  # refused before training the 3-epoch teacher
    assert not list(teacher_cache.glob("teachers/digits-digitnet_l-s0-e3-*.pt"))


def test_a_changed_training_split_is_refused(workdir, kdsweep):
    import optuna

    stores = _stores(workdir)
    code, out, err = kdsweep("study", "ce", "--dataset", "digits", "--data-size", "300", "--epochs", "1", "--device", "cpu",
                             "--trials", "1", "--study-name", "sp", *stores)
    assert code == 0, out + err
    study = optuna.load_study(study_name="sp", storage=stores[1])
    rec = study.user_attrs[fixed_inputs.SPLIT_ATTR]
    assert rec["train"] == 270 and rec["val"] == 30 and rec["host"] == socket.gethostname()
    # The attack: the same settings over other images (another host's dataset files, another torchvision copy).
    study.set_user_attr(fixed_inputs.SPLIT_ATTR, {**rec, "sha256": "f" * 64, "host": "gpu-node-7"})

    code, out, err = kdsweep("study", "ce", "--dataset", "digits", "--data-size", "300", "--epochs", "1", "--device", "cpu",
                             "--trials", "2", "--study-name", "sp", *stores)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert (f"its data split is ffffffffffff (270 train / 30 val images) (recorded on host gpu-node-7), this run's is "
            f"{rec['sha256'][:12]}") in err
    assert f"the data on host {socket.gethostname()} differs from host gpu-node-7's" in err
    assert len(_trials(workdir, "sp")) == 1


def test_a_worker_with_another_teacher_is_refused_under_the_lock(digits):
    """Two workers on a fresh study: the first records its teacher, the second (another teacher) is refused."""
    import optuna

    study = optuna.create_study(study_name="w", storage="sqlite:///:memory:")
    split = fixed_inputs.split_record(digits)
    fixed_inputs.check_and_record(study, split, {"sha256": "a" * 64, "path": "/cache/a.pt"})
    fixed_inputs.check_and_record(study, split, {"sha256": "a" * 64, "path": "/elsewhere/copy.pt"})  # same weights: fine
    with pytest.raises(UserError, match=r"its teacher is aaaaaaaaaaaa \(/cache/a.pt\), this run's is bbbbbbbbbbbb \(/b.pt\)"):
        fixed_inputs.check_and_record(study, split, {"sha256": "b" * 64, "path": "/b.pt"})


def test_the_split_digest_sees_the_images_and_the_validation_split(digits):
    base = fixed_inputs.split_digest(digits)
    assert fixed_inputs.split_digest(load_data("digits", None, 300, 0, 0.1, torch.device("cpu"))) == base
    assert fixed_inputs.split_digest(load_data("digits", None, 300, 1, 0.1, torch.device("cpu"))) != base  # other val indices
    digits.train_x[0, 0, 0, 0] += 1  # one pixel
    assert fixed_inputs.split_digest(digits) != base


# --------------------------------------------------------------------------- damaged teachers


def test_a_checkpoint_with_zeroed_weights_fails_its_checksum(tmp_path):
    path = _random_teacher(tmp_path / "t.pt", seed=0)
    checkpoint.load_model(path, "digitnet_l", (1, 8, 8), 10)  # intact: loads
    _zero_a_weight(path)
    checkpoint.load(path)  # the file still unpickles: only the checksum can tell
    with pytest.raises(checkpoint.ChecksumMismatch, match="is damaged: its weights hash to"):
        checkpoint.load_model(path, "digitnet_l", (1, 8, 8), 10)


def test_a_damaged_cached_teacher_is_moved_aside_and_fetched_from_the_tracking_server(tmp_path, monkeypatch, digits,
                                                                                      tracker):
    from kdsweep.training import teacher

    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "cache"))
    cfg = _cfg()
    said = []
    _, first = teacher.get_teacher(cfg, digits, tracker, said.append)
    path = Path(first["path"])
    _zero_a_weight(path)

    said.clear()
    model, info = teacher.get_teacher(cfg, digits, tracker, said.append)
    aside = list(path.parent.glob(path.name + ".corrupt-*"))
    assert len(aside) == 1
    assert "is damaged" in said[0] and aside[0].name in said[0]
    assert said[1].startswith(f"Fetched teacher {first['sha256'][:12]} from the tracking server") and len(said) == 2
    assert info["sha256"] == first["sha256"] == model_digest(model) == checkpoint.load(path)[checkpoint.SHA_KEY]
    with pytest.raises(checkpoint.ChecksumMismatch):
        checkpoint.load_model(aside[0])  # kept as it was, for a look


def test_a_host_without_the_studys_teacher_fetches_it_or_says_in_one_line_why_it_cannot(tmp_path, monkeypatch, digits,
                                                                                        tracker):
    """Issue 24: a second host (its own cache) gets the study's teacher from the tracking server, by the digest the
    study recorded; an artifact that cannot be had is one line, and so is a digest the server never saw."""
    import shutil

    from kdsweep.training import teacher

    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "host-a"))
    _, first = teacher.get_teacher(_cfg(), digits, tracker, [].append)
    sha = first["sha256"]

    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "host-b"))
    said = []
    _, info = teacher.get_teacher(_cfg(), digits, tracker, said.append, wanted=sha)
    assert info["sha256"] == sha and info["path"].startswith(str(tmp_path / "host-b"))
    assert len(said) == 1 and said[0].startswith(f"Fetched teacher {sha[:12]} from the tracking server")

    with pytest.raises(UserError, match=r"teacher 000000000000 is neither in this host's cache .* nor in the tracking "):
        teacher.get_teacher(_cfg(), digits, tracker, said.append, wanted="0" * 64)

    # A host whose cache holds another teacher under the same name: the study's is fetched beside it, the file kept.
    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "host-d"))
    own = _random_teacher(teacher.cache_path("digits", "digitnet_l", 0, 1, 300, 0.1), seed=9)
    said.clear()
    _, info = teacher.get_teacher(_cfg(), digits, tracker, said.append, wanted=sha)
    assert info["sha256"] == sha and Path(info["path"]).name == f"{own.stem}.{sha[:12]}.pt"
    assert said[0].startswith(f"note: {own} holds teacher ") and said[1].startswith(f"Fetched teacher {sha[:12]}")
    assert model_digest(checkpoint.load_model(own)[0]) != sha  # left as it was

    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "host-c"))
    shutil.rmtree(tmp_path / "artifacts")  # the artifact store lost (or out of reach)
    with pytest.raises(UserError) as e:
        teacher.get_teacher(_cfg(), digits, tracker, said.append, wanted=sha)
    assert str(e.value).startswith(f"cannot fetch the study's teacher {sha[:12]} (run ") and "\n" not in str(e.value)
    left = [p.name for p in (tmp_path / "host-c" / "teachers").iterdir() if not p.name.endswith(".lock")]
    assert not left  # nothing half-fetched left in the cache


def test_a_damaged_teacher_checkpoint_given_by_the_user_is_refused_in_one_line(workdir, kdsweep):
    bad = _random_teacher(workdir / "mine.pt", seed=1)
    _zero_a_weight(bad)
    code, out, err = kdsweep(*KD, "--trials", "1", "--teacher-checkpoint", bad, *_stores(workdir))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"checkpoint {bad} is damaged" in err
    assert bad.is_file()  # the user's file is never moved


def test_teacher_val_acc_is_measured_not_read_from_stale_metadata(tmp_path, digits, tracker):
    """An unverifiable (older kdsweep) file with useless weights and `val_acc = 1.0` in its metadata."""
    from kdsweep.training import teacher
    from kdsweep.training.loop import evaluate

    path = _random_teacher(tmp_path / "old.pt", seed=3, sha=False, meta={"val_acc": 1.0})
    said = []
    model, info = teacher.get_teacher(_cfg(teacher_checkpoint=str(path)), digits, tracker, said.append)
    assert info["stored_val_acc"] == 1.0
    assert info["val_acc"] == evaluate(model, digits, "val")[1] < 0.5
    assert said == [f"note: teacher {path} carries no checksum (written by an older kdsweep): its weights cannot be verified"]


# --------------------------------------------------------------------------- one teacher for many workers


def test_workers_on_a_cold_cache_train_the_teacher_once(tmp_path, monkeypatch, digits, tracker):
    from kdsweep.training import teacher

    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "cache"))
    training, trained = threading.Event(), []

    def slow_fake_training(dataset, arch, seed, epochs, data, tracker, path, **kw):
        trained.append(threading.current_thread().name)
        training.set()
        time.sleep(1.0)
        return _random_teacher(path, seed=len(trained))  # a second training would give other weights

    monkeypatch.setattr(teacher, "train_teacher", slow_fake_training)
    results, said = {}, {"a": [], "b": []}

    def worker(name):
        results[name] = teacher.get_teacher(_cfg(), digits, tracker, said[name].append)[1]

    a = threading.Thread(target=worker, args=("a",), name="a")
    a.start()
    assert training.wait(30)
    b = threading.Thread(target=worker, args=("b",), name="b")
    b.start()
    a.join(60)
    b.join(60)
    assert trained == ["a"]
    assert results["a"]["sha256"] == results["b"]["sha256"]
    assert [s for s in said["b"] if "waiting for it" in s] and not [s for s in said["b"] if "training one now" in s]


# --------------------------------------------------------------------------- nothing left RUNNING


@pytest.mark.slow  # a teacher training in a child process, killed
def test_a_killed_teacher_training_leaves_no_running_run(tmp_path, tracker):
    from kdsweep.tracking.cleanup import owner_tags, run_owner
    from kdsweep.tracking.vocabulary import OWNER_TAG
    from kdsweep.training import teacher

    env = cli_env(tmp_path)
    proc = start_cli(["teacher", "--dataset", "digits", "--epochs", "500", "--device", "cpu", "--out", str(tmp_path / "t.pt"),
                      "--tracking-uri", tracker.uri], tmp_path, env)

    def running():
        exp = tracker.client.get_experiment_by_name(teacher.TEACHERS_EXPERIMENT)
        if exp is None:
            return None
        runs = tracker.find_runs(exp.experiment_id, {"kdsweep.role": "teacher"}, statuses=("RUNNING",))
        return runs and ("val_acc" in runs[0].data.metrics) and runs[0]  # mid-training: an epoch logged

    run = wait_for(running, 120, proc, every=0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(run.data.tags[OWNER_TAG])["pid"] == proc.pid  # the owner tag, written as cleanup writes it

    mine = tracker.start(run.info.experiment_id, "live", {"kdsweep.role": "teacher", **owner_tags()})  # live: left alone
    assert teacher.close_dead_teacher_runs(tracker) == 1
    killed = tracker.client.get_run(run.info.run_id)
    assert killed.info.status == "KILLED"
    owner = run_owner(run)
    assert killed.data.tags["kdsweep.reason"] == f"its process {owner} is gone (killed or crashed)"
    assert tracker.client.get_run(mine).info.status == "RUNNING"


# --------------------------------------------------------------------------- file modes and permissions


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_checkpoints_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = _random_teacher(tmp_path / "t.pt", seed=0)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_an_unreadable_checkpoint_is_called_a_permission_problem(tmp_path, monkeypatch):
    path = _random_teacher(tmp_path / "t.pt", seed=0)
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: play the other user's 0600 file
        def denied(*a, **kw):
            raise PermissionError(13, "Permission denied", str(path))
        monkeypatch.setattr(checkpoint, "open", denied, raising=False)
    with pytest.raises(UserError) as e:
        checkpoint.load_model(path)
    assert "permission denied" in str(e.value) and "corrupt" not in str(e.value)


# --------------------------------------------------------------------------- the study's teacher after the study


def test_confirm_and_report_refuse_a_teacher_swapped_after_the_study(workdir, kdsweep):
    """Attack: the teacher file replaced by another valid teacher after the study; `confirm` distilled from the
    wrong one yet recorded the study's teacher_sha256, and `report` pooled seeds of two teachers, exit 0."""
    mine = _random_teacher(workdir / "mine.pt", seed=1)
    code, out, err = kdsweep(*KD, "--trials", "1", "--teacher-checkpoint", mine, "--accept-teacher")  # random weights
    assert code == 0, out + err
    studied = model_digest(checkpoint.load_model(mine)[0])
    swapped = model_digest(checkpoint.load_model(_random_teacher(mine, seed=2))[0])
    for command in (["confirm", "--seeds", "1"], ["report", "--no-plots", "--no-log"]):
        code, out, err = kdsweep(*command)
        line = err.strip().splitlines()[-1]
        assert code == 2 and "is not the one the studies distilled from" in line, err
        assert swapped[:12] in line and studied[:12] in line
    assert _confirm_runs(workdir) == 0  # nothing was trained with the wrong teacher

    _random_teacher(mine, seed=1)  # the right teacher back: both work again
    assert kdsweep("confirm", "--seeds", "1")[0] == 0
    assert _confirm_runs(workdir) == 1


def _confirm_runs(workdir: Path) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(ids, "tags.`kdsweep.role` = 'confirm'"))


def test_a_swapped_cached_teacher_is_replaced_by_the_one_mlflow_logged(workdir, kdsweep, monkeypatch):
    monkeypatch.setenv("KDSWEEP_CACHE", str(workdir / "cache"))  # a cache of its own: this test replaces a file in it
    assert kdsweep(*KD, "--trials", "1")[0] == 0
    (cached,) = (workdir / "cache" / "teachers").glob("*.pt")
    _random_teacher(cached, seed=3)
    code, out, err = kdsweep("confirm", "--seeds", "1")
    assert code == 0, err
    assert f"note: {cached} holds another teacher now; using the studies' own from run" in err


def test_a_frozen_teacher_lock_holder_is_named_and_the_waiter_stops(tmp_path, monkeypatch):
    """Attack: the process training a teacher frozen (SIGSTOP, as Ctrl-Z does) while a second worker waited on
    the teacher lock: the waiter waited for ever with one 'waiting' line."""
    import subprocess
    import sys

    from kdsweep.training.teacher import cache_lock

    monkeypatch.setenv("KDSWEEP_HEARTBEAT", "1")
    monkeypatch.setenv("KDSWEEP_GRACE", "3")
    path = tmp_path / "teacher.pt"
    script = ("import sys, time; from pathlib import Path; from kdsweep.training.teacher import cache_lock\n"
              "with cache_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    holder = subprocess.Popen([sys.executable, "-c", script, str(path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGSTOP)
        said, start = [], time.monotonic()
        with pytest.raises(UserError, match=rf":{holder.pid}, which has not beaten for \d+s \(stopped or hung\?\)"):
            with cache_lock(path, said.append):
                pytest.fail("the lock of a frozen holder was taken")
        assert time.monotonic() - start < 30
        assert f":{holder.pid}, holding it since" in said[0] and "waiting for it" in said[0]
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        holder.kill()
        holder.wait()
    with cache_lock(path, said.append):  # the holder gone, the lock is free again
        pass
