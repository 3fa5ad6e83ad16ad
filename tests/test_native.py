"""C kernels built on first use (kdsweep/common/native.py): built once per source, compiler and CPU and reused by
later processes, and where they cannot be had, None with one line said (the caller then uses torch's ops)."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
import torch

from kdsweep.common import native
from kdsweep.methods import rkd

SOURCE = Path(rkd.__file__).with_name("rkd_angle.c")


def _kernel() -> native.Kernel:
    return native.Kernel(SOURCE, {"rkd_angle_f32": (None, None)})


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(native.ENV, raising=False)
    return tmp_path / "cache"


def _counting_compiler(tmp_path: Path, real: str) -> Path:
    """A compiler that logs each build (not --version) and hands over to the real one."""
    log, cc = tmp_path / "builds.log", tmp_path / "cc"
    cc.write_text(f'#!/bin/sh\ncase "$*" in *-shared*) echo build >> "{log}";; esac\nexec "{real}" "$@"\n')
    cc.chmod(cc.stat().st_mode | stat.S_IEXEC)
    return log


def test_a_kernel_is_built_once_and_then_loaded_from_the_cache(own_cache, tmp_path, monkeypatch):
    real = native._compiler()
    if real is None:
        pytest.skip("no C compiler here")
    log = _counting_compiler(tmp_path, shutil.which(real) or real)
    monkeypatch.setenv("CC", str(tmp_path / "cc"))
    assert _kernel().library() is not None
    assert _kernel().library() is not None  # as a later process: the file in the cache folder
    assert log.read_text().splitlines() == ["build"]
    assert [p.suffix for p in (own_cache / "native").iterdir()] == [".so"]  # no temporary file left


@pytest.mark.parametrize("why", ["no compiler", "a failing build", "turned off"])
def test_without_a_kernel_the_angle_term_is_torchs_with_one_warning(why, own_cache, tmp_path, monkeypatch, capsys):
    if why == "turned off":
        monkeypatch.setenv(native.ENV, "0")
    else:
        monkeypatch.setenv("CC", "/nonexistent/cc" if why == "no compiler" else "false")
        monkeypatch.setattr(native.shutil, "which", lambda name: None)
    kernel = _kernel()
    monkeypatch.setattr(rkd, "_KERNEL", kernel)
    z = torch.randn(6, 4, requires_grad=True)
    assert not rkd.in_c(z)
    rkd.rkd_angle(z, torch.randn(6, 3)).backward()  # the torch form
    assert kernel.library() is None
    said = capsys.readouterr().err.splitlines()
    assert len(said) == (0 if why == "turned off" else 1), said
    assert all(line.startswith("warning: rkd_angle.c not built (") for line in said), said
    assert not (own_cache / "native").exists() or not any((own_cache / "native").iterdir())


def test_where_a_compiler_exists_rkd_computes_its_angle_term_in_c():
    """The kernel is what this machine's rkd runs (its build is not silently failing), where a compiler exists."""
    if native._compiler() is None or not native.enabled():
        pytest.skip("no C compiler here, or KDSWEEP_NATIVE=0")
    assert rkd.in_c(torch.zeros(3, 2))
    assert not rkd.in_c(torch.zeros(3, 2, dtype=torch.bfloat16))
