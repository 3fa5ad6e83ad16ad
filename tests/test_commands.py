"""Commands the default tier would otherwise only see fail: each run here to success, small and in-process.

The default tier runs every command: study and sweep (test_methods_e2e, test_study), methods
(test_method_forms), report and confirm (test_report, test_sources), bench (test_perf), ui and
status (test_clients), and teacher here.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch


def test_teacher_trains_writes_its_checkpoint_and_keeps_it(kdsweep, workdir):
    code, out, err = kdsweep("teacher", "--dataset", "digits", "--epochs", 1, "--device", "cpu", "--out", "t.pt")
    assert code == 0, err
    progress, summary = out.rstrip().splitlines()  # output in a file or pipe: a line per epoch, then the summary
    assert re.fullmatch(r"teacher digitnet_l: epoch 1/1, val_acc [01]\.\d{4}, \d+s", progress), out
    assert summary.startswith("teacher digitnet_l on digits: best epoch 1 of 1 (the one kept), val_acc=") \
        and summary.endswith("-> t.pt"), out
    ckpt = torch.load(workdir / "t.pt", weights_only=True)
    assert ckpt["meta"]["best_epoch"] == 0 and 0 <= ckpt["meta"]["val_acc"] <= 1
    code, out, err = kdsweep("teacher", "--dataset", "digits", "--epochs", 1, "--device", "cpu", "--out", "t.pt")
    assert code == 0 and out.startswith("teacher already cached at t.pt (--force to retrain)"), out + err
    assert Path(workdir / "t.pt").is_file()
