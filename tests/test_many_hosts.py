"""Many hosts, one study (issue 24), the parts that need no database server: the stores named by the environment,
and `kdsweep status` naming the hosts that work on a study. The two-host loopback tests are in test_postgres.py."""

from __future__ import annotations

import optuna

from kdsweep.report import status
from kdsweep.study.optuna_storage import default_storage
from kdsweep.tracking.tracker import default_tracking_uri
from kdsweep.tracking.vocabulary import OWNER_ATTR


def test_the_stores_can_come_from_the_environment_not_the_command_line(monkeypatch, tmp_path):
    monkeypatch.delenv("KDSWEEP_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_storage() == f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    assert default_tracking_uri() == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("KDSWEEP_STORAGE", "postgresql://kd@dbhost/kdsweep")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://trackhost:5000")
    assert default_storage() == "postgresql://kd@dbhost/kdsweep"
    assert default_tracking_uri() == "http://trackhost:5000"


def _running(owner: dict) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, user_attrs={OWNER_ATTR: owner})


def test_status_names_the_hosts_working_elsewhere():
    far = {"node": "another-node", "host": "gpu-node-7", "pid": 4242, "started": "1"}
    workers = status._workers([_running(far), _running(far), _running({**far, "host": "gpu-node-8"})], grace=60)
    assert workers["other_machines"] == 3
    assert workers["working_elsewhere"] == ["gpu-node-7:4242", "gpu-node-8:4242"]
    row = {"study": "s", "method": "ce", "per_trial": {}, "per_trial_tag": "", "budget": {"trials": None, "epochs": None, "text": ""}, "trained": 0,
           "epochs_spent": 0, "best": None, "workers": workers, "mlflow": {"experiment": ""},
           "trials": {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0, "RUNNING": 3, "WAITING": 0}}
    shown = status.text({"storage": "x", "tracking_uri": "y", "studies": [row], "notes": []})
    assert "3 running trial(s) owned elsewhere by gpu-node-7:4242, gpu-node-8:4242" in shown
