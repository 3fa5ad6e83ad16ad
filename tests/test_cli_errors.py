"""Bad input: one line naming the problem, exit status 2, no traceback, nothing half-written."""

from __future__ import annotations

import pytest
import torch

from kdsweep.training import checkpoint


def _nothing_written(workdir):
    import optuna

    db = workdir / "mlruns" / "optuna.db"
    if db.exists():  # opening the storage may create the schema, but never a study
        assert optuna.get_all_study_names(f"sqlite:///{db}") == []
    mlflow_db = workdir / "mlruns" / "mlflow.db"
    if mlflow_db.exists():
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{mlflow_db}")
        exps = [e.experiment_id for e in client.search_experiments()]
        assert client.search_runs(exps) == []


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdsweep: error: "), err
    assert "Traceback" not in err
    return lines[0]


class Payload:
    """An arbitrary pickled object: loading with weights_only=True must refuse it."""


STUDY = ["--trials", "1", "--epochs", "1", "--dataset", "digits"]


@pytest.mark.parametrize(
    "args, expect",
    [
        (["study", "no_such_method", *STUDY], "unknown method 'no_such_method'; known methods: "),
        (["study", "ce", "--dataset", "imagenet"], "unknown dataset 'imagenet'; known: cifar10"),
        (["study", "vanilla_kd", *STUDY, "--student", "resnet1000"], "unknown architecture 'resnet1000'"),
        (["study", "ce", *STUDY[2:], "--trials", "0"], "--trials must be at least 1"),
        (["study", "ce", *STUDY, "--storage", "notaurl"], "cannot open Optuna storage notaurl"),
        (["study", "ce", *STUDY, "--storage", "postgresql://u:secret@127.0.0.1:1/db"], "cannot open Optuna storage postgresql://u:***@127.0.0.1:1/db"),
        (["study", "ce", *STUDY, "--storage", "sqlite:///no/such/dir/x.db"], "/no/such/dir does not exist"),
        (["study", "ce", *STUDY, "--tracking-uri", "not a uri"], "tracking URI 'not a uri' is not a URL"),
        (["study", "vanilla_kd", *STUDY, "--teacher-checkpoint", "missing.pt"], "checkpoint missing.pt does not exist"),
        (["study", "missing.toml"], "study file missing.toml not found"),
    ],
)
def test_bad_input_is_one_line_exit_2(kdsweep, workdir, args, expect):
    code, out, err = kdsweep(*args)
    assert code == 2
    line = _one_line(err)
    assert expect in line, line
    assert "secret" not in out + err
    _nothing_written(workdir)


@pytest.mark.parametrize("command", [("study", "ce"), ("sweep", "--methods", "ce,vanilla_kd")])
def test_device_cuda_without_cuda(kdsweep, workdir, monkeypatch, command):
    """A sweep says so before it announces its studies (seen: 20 `[k/20] ...` lines, then the error)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = kdsweep(*command, *STUDY, "--device", "cuda")
    assert code == 2 and "no CUDA device is available" in _one_line(err)
    assert "[1/2]" not in out, out
    _nothing_written(workdir)


def test_corrupt_and_pickled_teacher_checkpoints_are_refused(kdsweep, workdir):
    (workdir / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    code, _, err = kdsweep("study", "vanilla_kd", *STUDY, "--teacher-checkpoint", "corrupt.pt")
    assert code == 2 and "corrupt or unsafe" in _one_line(err)

    torch.save({"format": checkpoint.FORMAT, "evil": Payload()}, workdir / "pickled.pt")
    code, _, err = kdsweep("study", "vanilla_kd", *STUDY, "--teacher-checkpoint", "pickled.pt")
    assert code == 2 and "is unsafe and was not loaded: it holds pickled Python objects (test_cli_errors.Payload)" in _one_line(err)
    _nothing_written(workdir)


def test_teacher_checkpoint_of_the_wrong_shape(kdsweep, workdir):
    from kdsweep.models.factory import build_model

    m = build_model("digitnet_l", (3, 32, 32), 10)
    checkpoint.save(workdir / "rgb.pt", "digitnet_l", (3, 32, 32), 10, {"student": m.state_dict()}, {})
    code, _, err = kdsweep("study", "vanilla_kd", *STUDY, "--teacher-checkpoint", "rgb.pt")
    assert code == 2 and "trained on inputs (3, 32, 32), the data has (1, 8, 8)" in _one_line(err)


@pytest.mark.parametrize(
    "toml, expect",
    [
        ('method = "vanilla_kd"\nbogus = 1\n', "unknown key(s) bogus"),
        ('method = "vanilla_kd"\n[defaults]\nepochz = 3\n', "unknown [defaults] key(s) epochz"),
        ('method = "vanilla_kd"\n[search]\ntemperature = { low = 5.0, high = 1.0 }\n', "bad range for 'temperature'"),
        ('method = "vanilla_kd"\n[search]\nalpha = { low = 0.0, high = 1.0, log = true }\n', "a log range needs low > 0"),
        ('method = "vanilla_kd"\n[search]\ngamma = { low = 1.0, high = 2.0 }\n', "[search] names 'gamma'"),
        ('method = "vanilla_kd"\n[fixed]\nalpha = "high"\n', "[fixed] alpha must be a number"),
        ('method = "nope"\n', "unknown method 'nope'"),
        ('method = "ce"\n[defaults\n', "cannot read study file"),
    ],
)
def test_bad_study_files(kdsweep, workdir, toml, expect):
    (workdir / "studies").mkdir()
    (workdir / "studies" / "mine.toml").write_text(toml)
    code, _, err = kdsweep("study", "studies/mine.toml", *STUDY)
    assert code == 2 and expect in _one_line(err)
    _nothing_written(workdir)


def test_help_teaches(kdsweep):
    from kdsweep.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["study"].format_help()
    assert "examples:" in text and "kdsweep study vanilla_kd --trials 50" in text and "resumes the study" in text


def test_ui_binds_loopback_on_the_study_store(kdsweep, workdir, monkeypatch):
    from kdsweep.tools import ui

    code, _, err = kdsweep("ui")
    assert code == 2 and "run a study first" in _one_line(err)
    (workdir / "mlruns").mkdir()
    (workdir / "mlruns" / "mlflow.db").touch()
    seen = {}
    monkeypatch.setattr(ui, "serve", lambda uri, host, port, say: seen.update(
        cmd=ui.server_command(host, port), env=ui.server_env(uri)) or 0)
    assert kdsweep("ui")[0] == 0
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "mlflow", "ui"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert seen["env"]["MLFLOW_BACKEND_STORE_URI"] == f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"


@pytest.mark.parametrize("command, resumes", [("methods", False), ("status", False), ("study", True)])
def test_an_interrupted_command_promises_a_resume_only_if_it_resumes(kdsweep, monkeypatch, command, resumes):
    """`kdsweep bench` stopped by SIGTERM once said "run the same command again to resume": it starts again."""
    from kdsweep import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, f"cmd_{command}", interrupted)
    code, out, err = kdsweep(command, *(["ce"] if command == "study" else []))
    assert code == 130
    assert err.strip() == "kdsweep: interrupted" + ("; run the same command again to resume." if resumes else ".")
