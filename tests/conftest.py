"""Shared fixtures: every test runs in its own directory (its own mlruns/), teachers are cached per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("teacher-cache")


@pytest.fixture(autouse=True)
def _cache_of_the_session(monkeypatch, teacher_cache):
    """No test writes to the user's ~/.cache/kdsweep (teachers, fusing measurements); a test may set its own."""
    monkeypatch.setenv("KDSWEEP_CACHE", str(teacher_cache))


@pytest.fixture
def workdir(tmp_path, monkeypatch, teacher_cache):
    """A fresh project directory: the CLI's default mlruns/ lands here; the teacher cache is shared."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDSWEEP_CACHE", str(teacher_cache))
    return tmp_path


@pytest.fixture
def kdsweep(workdir, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from kdsweep.cli import main

    def run(*args: str):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test (restored after): used by modules that trace or sum many small ops."""
    import torch  # here: conftest stays light for the tests that never touch torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

