"""Attacks on the files kdsweep writes: links planted at temporary names, names that climb out of the cache,
and temporary files that a killed writer leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from kdsweep.common.atomic import atomic_save, path_component
from kdsweep.data import builtin


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _tiny_mnist1d() -> dict[str, torch.Tensor]:
    x = torch.zeros(8, 1, builtin.MNIST1D_LENGTH)
    return {"x": x, "y": torch.arange(8) % 2, "x_test": x[:4], "y_test": torch.arange(4) % 2}


def test_a_link_planted_at_the_mnist1d_cache_temporary_name_is_never_written_through(tmp_path, monkeypatch):
    """Attack: the cache was written to `<file>.<pid>.tmp`, a name anyone could predict and plant a link at;
    the link's target (any file the user may write) was overwritten with torch data."""
    monkeypatch.setattr(builtin, "mnist1d_generate", _tiny_mnist1d)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "data" / "mnist1d"
    folder.mkdir(parents=True)
    builtin._mnist1d_arrays(tmp_path / "data")  # learn the cache file's name
    (cache,) = folder.glob("mnist1d-*.pt")
    cache.unlink()
    for name in (f"{cache.name}.{os.getpid()}.tmp", f".{cache.name}.{os.getpid()}.tmp"):
        (folder / name).symlink_to(victim)
    x, *_ = builtin._mnist1d_arrays(tmp_path / "data")
    assert victim.read_text() == "precious"
    assert cache.is_file() and not cache.is_symlink() and x.shape == (8, 1, builtin.MNIST1D_LENGTH)


def test_a_temporary_file_left_by_a_killed_writer_goes_at_the_next_save(tmp_path):
    """Attack: SIGKILL during a cache write (the image-folder decode cache) left its .tmp file forever."""
    target = tmp_path / "cache.pt"
    dead = tmp_path / f".cache.pt.{_dead_pid()}.k3y9.tmp"
    live = tmp_path / f".cache.pt.{os.getpid()}.other.tmp"  # a writer still at work: not ours to remove
    dead.write_bytes(b"half")
    live.write_bytes(b"busy")
    atomic_save({"a": torch.ones(2)}, target)
    assert not dead.exists() and live.exists()
    assert torch.load(target, weights_only=True)["a"].sum() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name])


def test_a_model_named_with_dots_and_slashes_stays_inside_the_teacher_cache(tmp_path, monkeypatch):
    """Attack: a model registered through the API as '../../x' wrote the teacher and its lock outside
    $KDSWEEP_CACHE (study names were cleaned; cache paths were not)."""
    from kdsweep.training.teacher import cache_path

    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "cache"))
    teachers = (tmp_path / "cache" / "teachers").resolve()
    for arch in ("../../escape", "a/../../b", "..", "/abs/path", "x\\..\\y"):
        path = cache_path("digits", arch, 0, 3, None, 0.1)
        assert path.resolve().parent == teachers and path.suffix == ".pt", (arch, path)
        assert path.with_name(path.name + ".lock").resolve().parent == teachers
    assert cache_path("digits", "torchvision:resnet18", 0, 3, None, 0.1).name == "digits-torchvision:resnet18-s0-e3.pt"
    assert path_component("../a") != path_component("._a") and path_component("ok-name") == "ok-name"
