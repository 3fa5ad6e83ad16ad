"""The budget counts compute: every trial that trained, and epochs summed over all trials (budget.py)."""

from __future__ import annotations

import os

import optuna
import pytest
from optuna.trial import TrialState, create_trial
from reliability_helpers import cli_env, load_trials, start_cli

from kdsweep.study.budget import Budget, Spent
from kdsweep.tracking.vocabulary import EPOCHS_ATTR

# Random sampling and the median pruner on tiny digits: trials get pruned, so counts of complete trials
# and of trained trials differ, which is what these tests are about.
PRUNING = ["--dataset", "digits", "--data-size", "300", "--device", "cpu", "--sampler", "random", "--pruner", "median"]


def _trial(state: TrialState, epochs: int | None, reported: int = 0) -> optuna.trial.FrozenTrial:
    attrs = {EPOCHS_ATTR: epochs} if epochs is not None else {}
    value = 0.5 if state == TrialState.COMPLETE else None
    return create_trial(state=state, value=value, user_attrs=attrs, intermediate_values={i: 0.1 for i in range(reported)})


def test_what_counts_and_when_a_trial_may_be_claimed():
    trials = [
        _trial(TrialState.COMPLETE, 5),
        _trial(TrialState.PRUNED, 2),
        _trial(TrialState.FAIL, 3),  # diverged in its third epoch: it trained
        _trial(TrialState.FAIL, None, reported=4),  # lost to a killed worker: retried, never counted
        _trial(TrialState.PRUNED, None, reported=1),  # from a study older than the attribute: its reported epochs
        _trial(TrialState.RUNNING, None),
    ]
    s = Spent.of(trials)
    assert (s.trials, s.epochs, s.running) == (4, 11, 1)
    assert s.by_state == {"COMPLETE": 1, "PRUNED": 2, "FAIL": 1}
    assert Budget(5, None, 5).room(s) is False  # 4 trained + 1 running = 5
    assert Budget(6, None, 5).room(s) is True
    assert not Budget(5, None, 5).done(s) and Budget(4, None, 5).done(s)
    # Epochs: the running trial reserves a whole trial (5), so 11 + 5 = 16 leaves room below 17 only.
    assert Budget(None, 16, 5).room(s) is False and Budget(None, 17, 5).room(s) is True
    assert Budget(None, 11, 5).done(s) and not Budget(None, 12, 5).done(s)
    # Both rules: whichever is reached first.
    assert Budget(4, 100, 5).done(s) and Budget(100, 11, 5).done(s)


def test_claimable_is_how_many_times_room_says_yes():
    for budget in (Budget(7, None, 5), Budget(None, 23, 5), Budget(None, 25, 5), Budget(6, 40, 5), Budget(3, 11, 5)):
        for done in range(0, 9):
            for running in range(0, 4):
                trials = [_trial(TrialState.COMPLETE, 1 if i % 2 else 5) for i in range(done)]
                trials += [_trial(TrialState.RUNNING, None)] * running
                s, k = Spent.of(trials), 0
                while budget.room(Spent(s.trials, s.epochs, s.running + k, s.by_state)):
                    k += 1
                assert budget.claimable(s) == k, (budget, done, running)
    assert Budget(None, None, 5).claimable(Spent(0, 0, 0, {})) is None


def _study(name_part: str):
    storage = f"sqlite:///{os.getcwd()}/mlruns/optuna.db"
    (name,) = [n for n in optuna.get_all_study_names(storage) if name_part in n]
    return optuna.load_study(study_name=name, storage=storage)


@pytest.mark.slow  # two whole studies; what counts is unit-tested above, summing and resuming in the default tier below
def test_trials_count_pruned_trials_too_and_resume_adds_the_difference(kdsweep):
    code, out, err = kdsweep("study", "ce", "--trials", 9, "--epochs", 3, *PRUNING)
    assert code == 0, err
    trials = _study("ce-").trials
    states = [t.state for t in trials]
    assert len(trials) == 9 and TrialState.PRUNED in states, states  # pruned ones are part of the 9, not extra
    assert "9 trained" in out
    # The same command again: nothing to run.
    code, out, _ = kdsweep("study", "ce", "--trials", 9, "--epochs", 3, *PRUNING)
    assert code == 0 and "nothing to run" in out and len(_study("ce-").trials) == 9
    # A larger budget adds exactly the difference.
    assert kdsweep("study", "ce", "--trials", 12, "--epochs", 3, *PRUNING)[0] == 0
    assert len(_study("ce-").trials) == 12


def test_budget_epochs_sums_all_trials_and_resumes(kdsweep):
    code, out, err = kdsweep("study", "ce", "--budget-epochs", 20, "--epochs", 3, *PRUNING)
    assert code == 0, err
    study = _study("ce-")
    spent = Spent.of(study.trials)
    assert 20 <= spent.epochs <= 20 + 3 - 1  # never more than one trial's epochs past the budget
    assert spent.epochs == sum(len(t.intermediate_values) for t in study.trials)
    assert spent.by_state.get("PRUNED", 0) >= 1  # pruning happened, so more than 20 / 3 trials ran
    assert f"{spent.epochs} epochs; budget 20 epochs" in out
    before = len(study.trials)
    assert "nothing to run" in kdsweep("study", "ce", "--budget-epochs", 20, "--epochs", 3, *PRUNING)[1]
    assert kdsweep("study", "ce", "--budget-epochs", 30, "--epochs", 3, *PRUNING)[0] == 0
    spent = Spent.of(_study("ce-").trials)
    assert 30 <= spent.epochs <= 32 and len(_study("ce-").trials) > before


@pytest.mark.slow  # two CLI workers with cold teacher caches; claims that never overshoot are unit-tested in test_reliability
@pytest.mark.parametrize("rule", [["--trials", "8"], ["--budget-epochs", "16"]])
def test_two_workers_share_one_budget_exactly(tmp_path, rule):
    env = cli_env(tmp_path)
    # Trials long enough that the workers overlap: with 300 images a trial took 0.1 s, and in a CI run one worker
    # trained all 8 before the other, held up opening the stores, claimed any (both started together).
    slower = ["--data-size", "1400", "--batch-size", "4"]
    args = ["study", "ce", "--epochs", "2", "--study-name", "shared", *PRUNING, *slower, *rule]
    procs = [start_cli(args, tmp_path, env, log=tmp_path / f"w{i}.log") for i in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, (tmp_path / "w0.log").read_text() + (tmp_path / "w1.log").read_text()
    trials = load_trials(f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}", "shared")
    spent = Spent.of(trials)
    assert spent.running == 0
    if rule[0] == "--trials":
        assert spent.trials == len(trials) == 8
    else:
        assert 16 <= spent.epochs <= 17
    owners = {t.user_attrs["kdsweep.owner"]["pid"] for t in trials}
    assert len(owners) == 2, "both workers trained trials"


def test_a_sweep_checks_every_study_before_training_anything(kdsweep):
    assert kdsweep("study", "vanilla_kd", "--trials", 1, "--epochs", 2, *PRUNING)[0] == 0  # random sampler
    code, out, err = kdsweep("sweep", "--methods", "ce,vanilla_kd", "--trials", 2, "--epochs", 2, "--dataset", "digits",
                             "--data-size", "300", "--device", "cpu")
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("kdsweep: conflict: study 'vanilla_kd-") and "sampler: random -> tpe" in lines[0]
    assert lines[-1].startswith("kdsweep: error: 1 of the sweep's studies exist with other settings; nothing was trained")
    storage = f"sqlite:///{os.getcwd()}/mlruns/optuna.db"
    assert not [n for n in optuna.get_all_study_names(storage) if n.startswith("ce-")]  # ce, listed first, never started
    # A suffix makes a separate set of studies, so the sweep runs.
    code, out, err = kdsweep("sweep", "--methods", "ce,vanilla_kd", "--trials", 2, "--epochs", 2, "--dataset", "digits",
                             "--data-size", "300", "--device", "cpu", "--study-suffix", "tpe")
    assert code == 0, err
    assert sum(n.endswith("-tpe") for n in optuna.get_all_study_names(storage)) == 2


def test_a_sweep_gives_every_method_the_same_epoch_budget_and_the_report_shows_the_cost(kdsweep, tmp_path):
    import pandas as pd

    code, out, err = kdsweep("sweep", "--methods", "ce,vanilla_kd", "--budget-epochs", 12, "--epochs", 3, *PRUNING)
    assert code == 0, err
    for m in ("ce", "vanilla_kd"):
        assert 12 <= Spent.of(_study(f"{m}-").trials).epochs <= 14
    assert kdsweep("report", "--format", "csv", "--out", tmp_path / "R", "--no-plots", "--no-log", "--device", "cpu")[0] == 0
    best = pd.read_csv(tmp_path / "R" / "best.csv").set_index("label")
    for m in ("ce", "vanilla_kd"):
        row = best.loc[m]
        assert row["budget"] == "12 epochs" and 12 <= row["epochs_all"] <= 14 and row["train_seconds_all"] > 0
        assert row["complete"] + row["pruned"] + row["failed"] == len(_study(f"{m}-").trials)


def test_status_gives_the_budget_as_numbers_and_adams_beta1_by_its_name():
    from kdsweep.report.status import _per_trial
    from kdsweep.study.budget import Budget

    for trials, epochs in ((20, None), (None, 60), (5, 40)):
        words = Budget(trials, epochs, 5).describe()
        assert Budget.read(words) == {"trials": trials, "epochs": epochs}
    adam = _per_trial({"optimizer": "adam", "epochs": 30, "batch_size": 100, "momentum": 0.9, "weight_decay": 0.0})
    assert adam["beta1"] == 0.9 and "momentum" not in adam
    assert _per_trial({"optimizer": "sgd", "momentum": 0.9})["momentum"] == 0.9
