"""Every method through the real CLI: on digits (all loss curves logged) and on seed 003's pair."""

from __future__ import annotations

import os

import optuna
import pytest
from mlflow.tracking import MlflowClient

from kdsweep.methods.registry import METHODS

ALL = sorted(METHODS)


def _trial_runs(study: str, experiment: str):
    client = MlflowClient(f"sqlite:///{os.getcwd()}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`kdsweep.study` = '{study}' and tags.`kdsweep.role` = 'trial'")
    return client, runs


DIGITS = ("--epochs", 1, "--dataset", "digits", "--pruner", "none")
SEED003 = ("--trials", 1, "--epochs", 1, "--dataset", "synthetic", "--data-size", 96, "--batch-size", 32,
           "--teacher-epochs", 1, "--teacher", "resnet18", "--student", "smallnet")


def _check_digits_study(method: str, trials: int) -> None:
    """Every trial logged each of the method's loss terms (beside the label term), once per epoch."""
    client, runs = _trial_runs(f"{method}-digits-digitnet_l-digitnet_s-s0-e1-b32", "kdsweep/digits/digitnet_l->digitnet_s")
    assert len(runs) == trials, method
    for run in runs:
        terms = {k for k in run.data.metrics if k.startswith("train_") and k not in ("train_loss", "train_acc")}
        assert "train_ce" in terms or method == "hard_label", method
        if method != "ce":
            assert len(terms) >= 2, (method, terms)  # a distillation term beside the label term
        for term in terms | {"train_loss", "val_acc"}:
            assert len(client.get_metric_history(run.info.run_id, term)) == 1, (method, term)


def _check_seed003_study(method: str) -> None:
    """Not only an exit code: the trial trained with every loss term finite, and was evaluated on test."""
    import math

    client, (run,) = _trial_runs(f"{method}-synthetic-resnet18-smallnet-s0-e1-b32-n96-te1", "kdsweep/synthetic/resnet18->smallnet")
    assert run.data.tags["kdsweep.state"] == "COMPLETE" and 0 <= run.data.metrics["test_acc"] <= 1, method
    terms = {k: v for k, v in run.data.metrics.items() if k.startswith("train_")}
    assert "train_loss" in terms and all(math.isfinite(v) for v in terms.values()), (method, terms)
    assert len(terms) >= (3 if method in ("ce", "hard_label") else 4), (method, terms)  # loss, acc and each term (KD: 2+)


def test_every_method_in_one_sweep_on_digits_logs_every_loss_term(kdsweep):
    # The default tier's end-to-end run of every method: one process, one teacher, every study through the CLI.
    code, out, err = kdsweep("sweep", "--methods", "all", "--trials", 1, *DIGITS)
    assert code == 0, err
    assert "skipping" not in out + err and "next: kdsweep report --dataset digits" in out, out
    client = MlflowClient(f"sqlite:///{os.getcwd()}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("kdsweep/digits/digitnet_l->digitnet_s")
    parents = client.search_runs([exp.experiment_id], "tags.`kdsweep.role` = 'study'")
    assert sorted(r.data.tags["kdsweep.method"] for r in parents) == ALL
    storage = f"sqlite:///{os.getcwd()}/mlruns/optuna.db"
    for method in ALL:
        study = optuna.load_study(study_name=f"{method}-digits-digitnet_l-digitnet_s-s0-e1-b32", storage=storage)
        assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 1, method
        _check_digits_study(method, trials=1)


def test_every_method_in_one_sweep_on_seed003_pair_synthetic(kdsweep):
    code, out, err = kdsweep("sweep", "--methods", "all", *SEED003)
    assert code == 0, err
    assert "skipping" not in out + err, out
    for method in ALL:
        _check_seed003_study(method)


@pytest.mark.slow  # each method in its own study: the sweep above covers them all in one process
@pytest.mark.parametrize("method", ALL)
def test_every_method_on_digits_logs_every_loss_term(kdsweep, method):
    code, _, err = kdsweep("study", method, "--trials", 2, *DIGITS)
    assert code == 0, err
    _check_digits_study(method, trials=2)


def test_methods_with_heads_count_and_save_them(kdsweep):
    import torch

    assert kdsweep("study", "crd", "--trials", 1, "--epochs", 1, "--dataset", "digits")[0] == 0
    client, (run,) = _trial_runs("crd-digits-digitnet_l-digitnet_s-s0-e1-b32", "kdsweep/digits/digitnet_l->digitnet_s")
    assert int(run.data.params["extra_params"]) > 0
    path = client.download_artifacts(run.info.run_id, "checkpoint/student.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["heads"] and sum(v.numel() for v in ckpt["heads"].values()) == int(run.data.params["extra_params"])
    # The student alone stays loadable for deployment.
    from kdsweep.training.checkpoint import load_model

    model, _ = load_model(path)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.slow  # each method in its own study: the sweep above covers them all in one process
@pytest.mark.parametrize("method", ALL)
def test_every_method_on_seed003_pair_synthetic(kdsweep, method):
    code, _, err = kdsweep("study", method, *SEED003)
    assert code == 0, err
    _check_seed003_study(method)


@pytest.mark.slow  # the sweep of every method above checks the same in the default tier
def test_sweep_runs_one_study_per_method(kdsweep):
    code, out, err = kdsweep("sweep", "--methods", "ce,vanilla_kd,dkd", "--trials", 3, "--epochs", 2, "--dataset", "digits")
    assert code == 0, err
    assert "next: kdsweep report" in out
    client = MlflowClient(f"sqlite:///{os.getcwd()}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("kdsweep/digits/digitnet_l->digitnet_s")
    parents = client.search_runs([exp.experiment_id], "tags.`kdsweep.role` = 'study'")
    assert sorted(r.data.tags["kdsweep.method"] for r in parents) == ["ce", "dkd", "vanilla_kd"]
    for m in ("ce", "vanilla_kd", "dkd"):
        study = optuna.load_study(study_name=f"{m}-digits-digitnet_l-digitnet_s-s0-e2-b32", storage=f"sqlite:///{os.getcwd()}/mlruns/optuna.db")
        assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 3


def test_sweep_refuses_a_pair_that_cannot_serve_a_listed_method(kdsweep):
    code, _, err = kdsweep("sweep", "--methods", "ce,fitnet", "--dataset", "mnist", "--trials", 1)
    assert code == 2 and "fitnet needs spatial feature maps" in err
