"""kdsweep in the tools people use (issue 13): the terminal and logs, the MLflow UI, a report page, `kdsweep status`."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from reliability_helpers import cli_env, run_cli, start_cli, stop, wait_for

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


# ---------------------------------------------------------------- output that fits where it goes

STUDY = ["--dataset", "digits", "--data-size", "300", "--epochs", "2", "--device", "cpu", "--pruner", "none"]
TRIAL_LINE = re.compile(r"^ce trial (\d+): (COMPLETE|PRUNED|FAIL)\S* val_acc=(\d\.\d{4}|-) epochs=(\d+) seconds=([\d.]+) lr=\S+$")


def _buffered_env(tmp):
    env = cli_env(tmp)
    env.pop("PYTHONUNBUFFERED")  # as under nohup or CI: a pipe or file is block-buffered unless we flush
    return env


def test_a_log_gets_one_flushed_line_per_trial_then_quiet_gets_only_the_summary(tmp_path):
    log = tmp_path / "nohup.out"
    proc = start_cli(["study", "ce", *STUDY, "--trials", "3"], tmp_path, _buffered_env(tmp_path), log)
    try:
        # Flushed at once: the first trial's line is in the file while the study still runs.
        wait_for(lambda: "ce trial 0:" in log.read_text(), 120, proc)
        assert proc.poll() is None, "the line came only when the process ended"
        assert proc.wait(120) == 0
    finally:
        stop(proc)
    out = log.read_text()
    lines = [m for m in map(TRIAL_LINE.match, out.splitlines()) if m]
    assert [int(m.group(1)) for m in lines] == [0, 1, 2], out
    assert all(m.group(2) == "COMPLETE" and m.group(4) == "2" and m.group(3) != "-" for m in lines), out
    assert re.search(r"^study ce-digits-\S+: ce, 2-epoch trials, budget 3 trials", out, re.M), out
    assert "\r" not in out and "it/s" not in out and "epoch/s" not in out  # no progress bars in a log

    quiet = run_cli(["study", "ce", *STUDY, "--trials", "4", "--quiet"], tmp_path, _buffered_env(tmp_path))
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.lstrip().startswith("study ce-digits-") and "4 complete" in quiet.stdout
    assert " trial 3:" not in quiet.stdout and "Resuming" not in quiet.stdout
    assert "Resuming study" in quiet.stderr and "trial 3:" not in quiet.stderr
