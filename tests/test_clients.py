"""kdsweep in the tools people use (issue 13): the terminal and logs, the MLflow UI, a report page, `kdsweep status`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reliability_helpers import REPO, cli_env

HEAVY = ("torch", "mlflow", "optuna")


# ---------------------------------------------------------------- help in a blink


@pytest.mark.parametrize("argv", [["--help"], ["study", "--help"], ["bench", "--help"], ["study", "--no-such-flag"],
                                  ["sweep", "--trials", "many"]])
def test_help_and_argument_errors_import_no_heavy_module(tmp_path, argv):
    # A fresh interpreter: this test process has long imported torch.
    probe = ("import contextlib, io, json, sys\n"
             "from kdsweep import cli\n"
             "cli.build_parser()\n"
             "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
             "    try:\n"
             "        cli.main(sys.argv[1:])\n"
             "    except SystemExit as e:\n"
             "        code = e.code\n"
             "print(json.dumps([code, [m for m in ('torch', 'mlflow', 'optuna') if m in sys.modules]]))\n")
    out = subprocess.run([sys.executable, "-c", probe, *argv], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True,
                         text=True, timeout=60)
    code, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert code == (0 if "--help" in argv else 2)
    assert heavy == [], f"`kdsweep {' '.join(argv)}` imported {heavy}"


def test_dataset_names_declared_for_the_parser_match_the_loaders():
    from kdsweep.catalog import DATASET_SUMMARIES
    from kdsweep.data import DATASETS

    assert list(DATASET_SUMMARIES) == list(DATASETS)
    assert DATASET_SUMMARIES == {name: spec.summary for name, spec in DATASETS.items()}
