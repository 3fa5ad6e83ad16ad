"""benchmarks/gpu.sh must work the first time a GPU is lent: CI runs its CPU dry run end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a pytest and a suite run in child processes: a minute on 2 cores; CI runs it in the slow tier
def test_gpu_script_dry_run_prints_the_table():
    # gpu.sh runs `python`: this test's, whether or not its virtual environment is activated
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run"], capture_output=True, text=True,
                       timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = re.findall(r"^\s+(\d+)\s+(fused|serial)\s+([\d.]+)\s+([\d.]+)\s+(\S+)\s+([\d.]+)\s+([\d.]+)$", r.stdout, re.M)
    assert [(int(k), p) for k, p, *_ in rows] == [(1, "serial"), (2, "fused"), (2, "serial")], r.stdout
    for k, _, wall, per_trial, _, floor, frac in rows:
        # wall is printed to 0.1 s, the others to 0.01: compare within what the rounding allows
        assert abs(float(wall) / int(k) - float(per_trial)) <= 0.05 / int(k) + 0.006
        assert float(floor) > 0 and abs(float(frac) - float(floor) / float(wall)) <= float(frac) * 0.06 / float(wall) + 0.01
    assert "dry run" in r.stdout


def test_suite_refuses_without_cuda_unless_dry_run():
    import torch

    if torch.cuda.is_available():
        return
    r = subprocess.run([sys.executable, "-m", "kdsweep.tools.gpu_suite"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "no CUDA device" in r.stdout
