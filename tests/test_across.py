"""`kdsweep report --across`: the statistics against scipy and hand-computed numbers, the block rules, a tiny store."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from kdsweep.report.across import Block, analyse, friedman_from_frame
from kdsweep.report.friedman import block_ranks, cd_groups, critical_difference, friedman, q_alpha

# 5 blocks x 4 methods; the last block has a tie between methods 0 and 1
SCORES = np.array([[0.80, 0.75, 0.70, 0.60],
                   [0.82, 0.79, 0.81, 0.61],
                   [0.78, 0.70, 0.72, 0.65],
                   [0.90, 0.85, 0.86, 0.88],
                   [0.70, 0.70, 0.66, 0.64]])


def test_ranks_put_the_best_first_and_average_ties():
    ranks = block_ranks(SCORES)
    assert ranks[0].tolist() == [1, 2, 3, 4]
    assert ranks[4].tolist() == [1.5, 1.5, 3, 4]
    assert ranks.sum(axis=1).tolist() == [10] * 5  # k (k + 1) / 2 in every block


@pytest.mark.parametrize("scores", [SCORES, SCORES[:4], np.random.default_rng(3).random((9, 6))])
def test_friedman_matches_scipy(scores):
    stat, p = friedman(scores)
    want = stats.friedmanchisquare(*scores.T)
    assert stat == pytest.approx(want.statistic, rel=1e-12)
    assert p == pytest.approx(want.pvalue, rel=1e-10)


def test_friedman_by_hand_without_ties():
    # block ranks: [1,2,3,4], [1,3,2,4], [1,3,2,4], [1,4,3,2] -> rank sums R = 4, 12, 10, 14;
    # chi2 = 12 / (4 * 4 * 5) * (16 + 144 + 100 + 196) - 3 * 4 * 5 = 0.15 * 456 - 60 = 8.4
    stat, _ = friedman(SCORES[:4])
    n, k = 4, 4
    assert stat == pytest.approx(12 / (n * k * (k + 1)) * (4 ** 2 + 12 ** 2 + 10 ** 2 + 14 ** 2) - 3 * n * (k + 1))
    assert stat == pytest.approx(8.4)


def test_q_alpha_is_demsars_table():
    # Demšar (2006), Table 5a: two-tailed Nemenyi test, alpha = 0.05
    table = {2: 1.960, 3: 2.343, 4: 2.569, 5: 2.728, 6: 2.850, 7: 2.949, 8: 3.031, 9: 3.102, 10: 3.164}
    for k, q in table.items():
        assert q_alpha(k) == pytest.approx(q, abs=1.5e-3)


def test_critical_difference_by_hand():
    # k = 4 methods over N = 5 blocks: CD = 2.569 * sqrt(4 * 5 / (6 * 5)) = 2.569 * 0.8165 = 2.0976
    assert critical_difference(4, 5) == pytest.approx(2.0976, abs=2e-3)
    # Demšar's own example: k = 4 classifiers, N = 14 data sets, CD = 1.25
    assert critical_difference(4, 14) == pytest.approx(1.25, abs=5e-3)
    assert math.isnan(critical_difference(1, 5))


def test_cd_groups_are_the_maximal_runs_closer_than_cd():
    ranks = {"a": 1.0, "b": 1.5, "c": 2.4, "d": 3.9}
    assert cd_groups(ranks, 1.0) == [["a", "b"], ["b", "c"]]
    assert cd_groups(ranks, 3.0) == [["a", "b", "c", "d"]]
    assert cd_groups(ranks, 0.1) == []  # every method differs: no bar


def _block(name: str, accs: dict[str, list[float]], control: str = "", teacher_seed: int = 0) -> Block:
    return Block("digits", name, "s", 0, "e1-b32", teacher_seed, control, 0.9, accs)


def test_missing_methods_are_left_out_of_the_test_and_said():
    a = _block("t1", {"ce": [0.5] * 3, "kd": [0.6] * 3, "fit": [0.7] * 3})
    b = _block("t2", {"ce": [0.5] * 3, "kd": [0.55] * 3})  # no feature map: fit did not run
    c = _block("t3", {"ce": [0.6] * 3, "kd": [0.5] * 3})
    res = analyse([a, b, c])
    assert set(res.mean_ranks) == {"ce", "kd"}
    assert res.mean_ranks["kd"] == pytest.approx((1 + 1 + 2) / 3)
    assert any("left out" in n and "fit" in n for n in res.notes)
    row = res.table.set_index("method").loc["fit"]
    assert math.isnan(row["mean_rank"]) and row["blocks"] == 1 and row["delta_vs_ce"] == pytest.approx(0.2)
    assert (res.stat, res.p) == pytest.approx(friedman_from_frame(res.frame))


def test_a_gain_that_survives_an_untrained_teacher_is_regularisation():
    rng = np.random.default_rng(0)
    noise = lambda m: list(m + 0.002 * rng.standard_normal(5))  # noqa: E731
    real = [_block(f"t{i}", {"ce": noise(0.60), "geo": noise(0.70), "kd": noise(0.65), "logit": noise(0.59)})
            for i in range(3)]
    control = _block("t0", {"ce": noise(0.60), "geo": noise(0.71), "kd": noise(0.60), "logit": noise(0.55)}, "untrained")
    res = analyse(real + [control])
    gain = res.table.set_index("method")["gain_from"]
    assert gain["geo"] == "regularisation"
    assert gain["kd"] == "teacher"
    assert gain["logit"] == "no gain"
    assert res.table["method"].tolist()[0] == "geo"  # the control block is never ranked: geo wins every real block
    assert len(res.frame) == 16 and set(res.frame["control"]) == {"none", "untrained"}


@pytest.mark.slow
def test_across_end_to_end_on_three_teacher_seeds_and_a_control(workdir, kdsweep):
    """Three teacher seeds of one pair (three blocks sharing one ce study) and an untrained-teacher control:
    confirmed, ranked, written; blocks.csv gives back the printed Friedman p."""
    import pandas as pd

    import kdsweep.api as kd

    tiny = {"dataset": "digits", "epochs": 1, "trials": 1, "teacher_epochs": 1, "data_size": 300, "device": "cpu"}
    runs = kd.sweep_teacher_seeds(["ce", "vanilla_kd"], [0, 1, 2], **tiny)
    assert [r.studies["vanilla_kd"].summary["study"].endswith(t) for r, t in zip(runs.values(), ("te1", "ts1", "ts2"))] == [True] * 3
    assert len({r.studies["ce"].summary["study"] for r in runs.values()}) == 1  # one ce study serves every teacher
    control = kd.sweep(["vanilla_kd"], teacher_control="untrained", **tiny).studies["vanilla_kd"].summary
    assert control["study"].endswith("-untrained") and control["teacher"]["epochs"] == 0

    from kdsweep.report.stored_studies import open_tracker, search_all

    tracker = open_tracker(None)
    exp = tracker.client.get_experiment_by_name("kdsweep/digits/digitnet_l->digitnet_s").experiment_id
    kd_runs = [r.data.params for r in search_all(tracker.client, exp, "tags.`kdsweep.role` = 'study'")
               if r.data.params.get("teacher_sha256")]
    assert len({p["teacher_sha256"] for p in kd_runs}) == 4  # three trained teachers and the untrained one
    assert len({p["split_sha256"] for p in kd_runs}) == 1  # on one split: only the teacher differs

    code, out, err = kdsweep("confirm", "--across", "--seeds", "3", "--device", "cpu")
    assert code == 0, err
    assert out.count("3 trained") == 5  # ce once, vanilla_kd in each of the four blocks
    code, out, err = kdsweep("report", "--across", "--out", "R", "--format", "md,csv,html")
    assert code == 0, err
    assert "chi2 = " in out and "CD = " in out and "1 control block(s)" in out

    blocks = pd.read_csv("R/blocks.csv")
    assert len(blocks) == 8 and (blocks["control"] == "untrained").sum() == 2
    assert sorted(blocks.loc[blocks["control"] == "none", "teacher_seed"].unique().tolist()) == [0, 1, 2]
    stat, p = friedman_from_frame(blocks)
    assert f"chi2 = {stat:.3f}, p = {p:.3g}" in out
    page = (workdir / "R" / "report.html").read_text()
    assert "data:image/png;base64" in page and (workdir / "R" / "plots" / "cd_diagram.png").is_file()
    table = pd.read_csv("R/across.csv").set_index("method")
    assert table.loc["vanilla_kd", "gain_from"] != "no control block"

    # the pair's own report of one teacher seed's block still compares with the shared ce
    ranking = kd.report(dataset="digits", per_trial="e1-b32-n300-te1-ts1", log=False)["ranking"]
    assert set(ranking["label"]) == {"ce", "vanilla_kd"}
    code, _, err = kdsweep("report", "--across", "--dataset", "digits")
    assert code == 2 and "--dataset" in err


def test_the_results_check_recomputes_the_printed_friedman_p_from_blocks_csv(tmp_path):
    """benchmarks/across.py --check: blocks.csv as written and read back gives the p that across.md prints;
    a blocks.csv edited afterwards is caught."""
    import importlib.util
    from pathlib import Path

    from kdsweep.report.across import to_markdown

    spec = importlib.util.spec_from_file_location("across_script", Path(__file__).parent.parent / "benchmarks" / "across.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rng = np.random.default_rng(1)
    blocks = [_block(f"t{i}", {m: list(0.6 + 0.05 * j + 0.03 * rng.standard_normal(3)) for j, m in enumerate("abcd")})
              for i in range(5)]
    res = analyse(blocks)
    res.frame.to_csv(tmp_path / "blocks.csv", index=False)
    (tmp_path / "across.md").write_text(to_markdown(res, "test"))
    assert f"p = {res.p:.3g}" in script.check(tmp_path)
    edited = res.frame.copy()
    edited.loc[(edited["method"] == "a") & edited["teacher"].isin(["t0", "t1"]), "test_acc_mean"] = 0.99  # a: last -> first
    edited.to_csv(tmp_path / "blocks.csv", index=False)
    with pytest.raises(SystemExit, match="check failed"):
        script.check(tmp_path)


def test_teacher_seed_and_control_name_the_kd_studies_but_not_the_teacher_free_ones():
    from kdsweep.common.errors import UserError
    from kdsweep.study.config import StudyConfig, shared_per_trial

    def cfg(method, **kw):
        return StudyConfig(method=method, name=method, dataset="digits", epochs=2, **kw)

    assert cfg("vanilla_kd", teacher_seed=1).budget_tag == "e2-b32-ts1"
    assert cfg("vanilla_kd", teacher_seed=1, teacher_control="untrained").budget_tag == "e2-b32-ts1-untrained"
    assert cfg("vanilla_kd", teacher_seed=0).budget_tag == "e2-b32"  # the default teacher: the same study as before
    assert cfg("ce", teacher_seed=1, teacher_control="untrained").budget_tag == "e2-b32"  # one ce for every block
    assert cfg("vanilla_kd", seed=3, teacher_seed=1).resolved_teacher_seed == 1
    assert cfg("vanilla_kd", seed=3).resolved_teacher_seed == 3
    assert shared_per_trial("e2-b32-te5-ts1-untrained") == shared_per_trial("e2-b32-te5") == "e2-b32-te5"
    with pytest.raises(UserError, match="--teacher-checkpoint"):
        cfg("vanilla_kd", teacher_seed=1, teacher_checkpoint="t.pt")
    with pytest.raises(UserError, match="teacher-control"):
        cfg("vanilla_kd", teacher_control="shuffled")


def test_the_results_script_leaves_a_feature_method_out_of_a_pair_without_maps():
    """benchmarks/across.py: an explicit --methods list keeps, per pair, the methods the pair can serve (a feature-map
    method is skipped, with why, where the student is an MLP) instead of refusing the whole run; `all` is passed on."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("across_script", Path(__file__).parent.parent / "benchmarks" / "across.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    mlp = {"dataset": "mnist1d", "teacher": "cnn1d", "student": "mlp100"}
    kept, skipped = script._servable("ce,fitnet,pkt", mlp, {"device": "cpu"})
    assert kept == "ce,pkt" and list(skipped) == ["fitnet"] and "feature maps" in skipped["fitnet"]
    kept, skipped = script._servable("ce,fitnet", {**mlp, "student": "cnn1d_s"}, {"device": "cpu"})
    assert kept == "ce,fitnet" and skipped == {}
    assert script._servable("all", mlp, {}) == ("all", {})
