"""How kdsweep is installed: `import kdsweep` must find the real package from any folder."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_import_kdsweep_from_the_folder_that_holds_the_clone(tmp_path):
    """A clone in ~ worked on from ~ (or a Jupyter server started there): the clone's folder `kdsweep/` was taken
    for the package, a namespace package, and `kdsweep.report` for the `report/` folder the README's `--out
    report/` wrote: `ImportError: cannot import name 'run_report'` after minutes of work."""
    try:
        importlib.metadata.distribution("kdsweep")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("kdsweep is not installed here (python -m pip install -e '.[test]' installs it)")
    clone = tmp_path / "kdsweep"  # the clone's folder, seen from its parent, holding a report written there
    (clone / "report").mkdir(parents=True)
    (clone / "README.md").write_text("a clone\n")
    (tmp_path / "report").mkdir()  # and the README's report/ in the current folder
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import kdsweep, kdsweep.api, kdsweep.report.build; print(kdsweep.__file__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1000:]
    found = r.stdout.strip().splitlines()[-1]
    assert found != "None" and Path(found).name == "__init__.py" and tmp_path not in Path(found).parents
