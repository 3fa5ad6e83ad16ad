"""`kdsweep report --across`: does a method's rank hold over pairs and teachers? (Demšar, JMLR 2006)

A block is one (dataset, teacher, student, seed, per-trial settings, teacher seed) with confirmed seeds: the
studies `kdsweep report` would compare for it, each scored by the mean test accuracy of its confirmation runs
(a study without any is left out of its block, and said). The teacher-free studies (ce) are shared by every
teacher seed's block of their pair (stored_studies.select). Over the blocks with a trained teacher:

  * each method's mean rank (rank 1 = best in a block, ties averaged) and its mean Δ vs ce;
  * the Friedman test and the Nemenyi critical difference, with a critical-difference diagram.

Friedman needs every method in every block. The rule: the test, the ranks and the diagram use the methods
present in every trained-teacher block; the others (a feature-map method where a student has no map) are
listed with their Δ vs ce over the blocks they ran in, and named as left out.

Blocks whose teacher is a control (`--teacher-control untrained`) are never ranked: each method's Δ vs ce
there sits beside the trained one, and a gain that stays significant without a trained teacher (Welch vs
ce, Holm-corrected within the block, in every control block) is labelled regularisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kdsweep.common import atomic
from kdsweep.common.errors import UserError
from kdsweep.report.friedman import block_ranks, cd_groups, critical_difference, friedman
from kdsweep.report.metrics import ALPHA, MIN_SEEDS_FOR_TESTS, holm, welch_p
from kdsweep.report.stored_studies import (
    REFERENCE,
    Say,
    Selection,
    StudyRuns,
    kdsweep_experiments,
    open_tracker,
    search_all,
    select,
)
from kdsweep.study.config import shared_per_trial
from kdsweep.tracking.vocabulary import STATE_ORPHANED, STATE_TAG

BLOCK_KEYS = ["dataset", "teacher", "student", "seed", "per_trial", "teacher_seed", "control"]


@dataclass
class Block:
    """One block: where it comes from, and each study's confirmed test accuracies (one per confirmation seed)."""

    dataset: str
    teacher: str
    student: str
    seed: int
    per_trial: str
    teacher_seed: int
    control: str  # "" for a trained teacher, "untrained" for the control
    teacher_val_acc: float
    accs: dict[str, list[float]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        what = f", {self.control} teacher" if self.control else ""
        return (f"{self.dataset} {self.teacher}->{self.student} s{self.seed} {shared_per_trial(self.per_trial)}, "
                f"teacher seed {self.teacher_seed}{what}")

    def mean(self, label: str) -> float:
        return float(np.mean(self.accs[label]))


def confirmed_accs(s: StudyRuns) -> list[float]:
    """The test accuracy of each confirmation seed of the study's best config (the latest run of a seed)."""
    by_seed = {}
    for r in sorted(s.confirms, key=lambda r: r.info.start_time):
        if "test_acc" in r.data.metrics:
            by_seed[r.data.tags.get("kdsweep.confirm_seed")] = r.data.metrics["test_acc"]
    return list(by_seed.values())


def _block(sel: Selection, notes: list[str]) -> Block | None:
    """The block of one selection, or None (and a note) when it has fewer than two confirmed methods."""
    teachers = [s for s in sel.studies if s.uses_teacher]
    seeds = {(s.teacher_seed, s.teacher_control) for s in teachers}
    teacher_seed, control = min(seeds) if seeds else (sel.seed, "")
    val = next((s.params.get("teacher_val_acc") for s in teachers if s.params.get("teacher_val_acc")), None)
    block = Block(sel.dataset, sel.teacher, sel.student, sel.seed, teachers[0].per_trial if teachers else "",
                  teacher_seed, control, float(val) if val else math.nan)
    for s in sel.studies:
        accs = confirmed_accs(s)
        if accs:
            block.accs[s.label] = accs
        else:
            notes.append(f"{block.name}: {s.label} has no confirmation runs, left out of the block "
                         f"(`kdsweep confirm --across` confirms every block)")
    if len(block.accs) < 2:
        notes.append(f"{block.name}: fewer than two confirmed methods, not a block")
        return None
    return block


def selections(tracker) -> list[Selection]:
    """Every block's studies in the store: one selection per (pair, seed, per-trial settings with a teacher)."""
    out = []
    for experiment, (dataset, teacher, student) in kdsweep_experiments(tracker).items():
        exp_id = tracker.client.get_experiment_by_name(experiment).experiment_id
        parents = [StudyRuns(r, [], []) for r in search_all(tracker.client, exp_id, "tags.`kdsweep.role` = 'study'")
                   if r.data.tags.get(STATE_TAG) != STATE_ORPHANED]
        groups: dict[tuple[int, str], bool] = {}
        for s in parents:
            key = (int(s.params.get("seed", 0)), s.per_trial)
            groups[key] = groups.get(key, False) or s.uses_teacher
        for (seed, per_trial), has_teacher in sorted(groups.items()):
            if has_teacher:  # a group of teacher-free studies only is shared by the teacher blocks of its pair
                out.append(select(tracker, dataset, teacher, student, seed, per_trial=per_trial))
    if not out:
        raise UserError("no blocks in the store: `kdsweep report --across` needs studies that distil from a teacher")
    return out


def collect(tracker) -> tuple[list[Block], list[str]]:
    """The store's blocks and what was left out of them."""
    notes: list[str] = []
    blocks = [b for b in (_block(sel, notes) for sel in selections(tracker)) if b is not None]
    if not blocks:
        raise UserError("no block has two confirmed methods: run `kdsweep confirm --across --seeds 5` first")
    return blocks, notes


def blocks_frame(blocks: list[Block]) -> pd.DataFrame:
    """One row per (block, method): the block's keys, the method, its confirmation seeds and their mean test acc
    (docs/results/across/blocks.csv: everything the Friedman test needs, to recompute it elsewhere)."""
    rows = []
    for b in blocks:
        for label, accs in sorted(b.accs.items()):
            rows.append({"dataset": b.dataset, "teacher": b.teacher, "student": b.student, "seed": b.seed,
                         "per_trial": b.per_trial, "teacher_seed": b.teacher_seed, "control": b.control or "none",
                         "teacher_val_acc": b.teacher_val_acc, "method": label, "n_seeds": len(accs),
                         "test_acc_mean": float(np.mean(accs)),
                         "test_acc_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else math.nan})
    return pd.DataFrame(rows)


def complete_matrix(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """From a blocks frame: the trained-teacher blocks x the methods present in all of them (mean test acc), and
    the methods left out for missing from some block."""
    real = frame[frame["control"] == "none"]
    wide = real.pivot_table(index=BLOCK_KEYS, columns="method", values="test_acc_mean", aggfunc="first")
    complete = [m for m in wide.columns if wide[m].notna().all()]
    return wide[complete], sorted(set(wide.columns) - set(complete))


def friedman_from_frame(frame: pd.DataFrame) -> tuple[float, float]:
    """The Friedman statistic and p-value of a blocks frame (e.g. blocks.csv read back), by the rule above."""
    matrix, _ = complete_matrix(frame)
    return friedman(matrix.to_numpy())


@dataclass
class Across:
    """The analysis: the ranking table, the statistics, the notes that say what was used and left out."""

    blocks: list[Block]
    table: pd.DataFrame
    frame: pd.DataFrame  # blocks_frame
    stat: float
    p: float
    cd: float
    mean_ranks: dict[str, float]
    groups: list[list[str]]
    notes: list[str]


def _deltas(blocks: list[Block], label: str) -> list[float]:
    return [b.mean(label) - b.mean(REFERENCE) for b in blocks if label in b.accs and REFERENCE in b.accs]


def _control_p(block: Block) -> dict[str, float]:
    """Holm-corrected Welch p of each method vs ce within a control block (methods with enough seeds)."""
    if REFERENCE not in block.accs or len(block.accs[REFERENCE]) < MIN_SEEDS_FOR_TESTS:
        return {}
    tested = [m for m, a in block.accs.items() if m != REFERENCE and len(a) >= MIN_SEEDS_FOR_TESTS]
    adj = holm([welch_p(block.accs[m], block.accs[REFERENCE]) for m in tested])
    return dict(zip(tested, adj))


def _gain_from(trained: float, control: float, significant: bool) -> str:
    """In words: where a method's mean gain over ce comes from (the table's last column)."""
    if math.isnan(trained):
        return "–"
    if trained <= 0:
        return "no gain"
    if math.isnan(control):
        return "no control block"
    if not (significant and control > 0):
        return "teacher"
    return "regularisation" if control >= trained else "regularisation + teacher"


def _row(label: str, real: list[Block], controls: list[Block], ranks: dict[str, float],
         control_p: list[dict[str, float]]) -> dict:
    deltas, c_deltas = _deltas(real, label), _deltas(controls, label)
    ps = [cp.get(label, math.nan) for b, cp in zip(controls, control_p) if label in b.accs]  # NaN: not tested there
    significant = bool(ps) and all(p < ALPHA for p in ps)
    trained, control = (float(np.mean(deltas)) if deltas else math.nan), (float(np.mean(c_deltas)) if c_deltas else math.nan)
    return {"method": label, "blocks": sum(label in b.accs for b in real), "mean_rank": ranks.get(label, math.nan),
            "delta_vs_ce": trained, "beats_ce_blocks": sum(d > 0 for d in deltas), "ce_blocks": len(deltas),
            "delta_vs_ce_untrained": control, "p_vs_ce_untrained_holm": max(ps) if ps else math.nan,
            "gain_from": _gain_from(trained, control, significant) if label != REFERENCE else "–"}


def analyse(blocks: list[Block], notes: list[str] | None = None, alpha: float = ALPHA) -> Across:
    """Mean ranks, Friedman, Nemenyi CD and the Δ vs ce (trained and control teachers) of the blocks."""
    notes = list(notes or [])
    real = [b for b in blocks if not b.control]
    controls = [b for b in blocks if b.control]
    frame = blocks_frame(blocks)
    if not real:
        raise UserError("every block has a control teacher: the ranking needs blocks with a trained teacher")
    matrix, left_out = complete_matrix(frame)
    ranks = dict(zip(matrix.columns, block_ranks(matrix.to_numpy()).mean(axis=0))) if matrix.shape[1] else {}
    stat, p = friedman(matrix.to_numpy())
    n, k = matrix.shape
    cd = critical_difference(k, n, alpha)
    groups = cd_groups(ranks, cd) if not math.isnan(cd) else []
    control_p = [_control_p(b) for b in controls]
    labels = sorted({m for b in blocks for m in b.accs})
    table = pd.DataFrame([_row(m, real, controls, ranks, control_p) for m in labels])
    table = table.sort_values(["mean_rank", "delta_vs_ce", "method"], ascending=[True, False, True],
                              na_position="last").reset_index(drop=True)
    notes += _stat_notes(n, k, stat, p, cd, alpha, left_out, controls)
    return Across(blocks, table, frame, stat, p, cd, ranks, groups, notes)


def _stat_notes(n: int, k: int, stat: float, p: float, cd: float, alpha: float, left_out: list[str],
                controls: list[Block]) -> list[str]:
    out = [f"Friedman test over {n} blocks with a trained teacher and the {k} methods present in every one: "
           + (f"chi2 = {stat:.3f}, p = {p:.3g}" if not math.isnan(stat) else "not computed (it needs 2 blocks and 2 methods)"),
           f"Nemenyi critical difference (alpha = {alpha:g}; q_alpha from the studentized range, Demšar 2006): "
           + (f"CD = {cd:.3f}: mean ranks closer than that are not significantly different (a bar in the diagram)"
              if not math.isnan(cd) else "not computed")]
    if left_out:
        out.append(f"left out of the ranks and the test (missing from some trained-teacher block, Friedman needs "
                   f"complete blocks): {', '.join(left_out)}; their Δ vs ce is over the blocks they ran in")
    if controls:
        out.append(f"{len(controls)} control block(s) with an untrained teacher are not ranked; gain_from says "
                   f"'regularisation' when a method's gain over ce stays significant there (Welch, Holm within the "
                   f"block, alpha = {alpha:g}, in every control block) and is at least its gain with the trained teacher")
    return out


# ---------------------------------------------------------------- output


def _fmt(v, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def display(table: pd.DataFrame) -> pd.DataFrame:
    """The ranking table as the terminal and the pages show it (accuracy differences in points)."""
    return pd.DataFrame({
        "method": table["method"], "blocks": table["blocks"].astype(str), "mean rank": table["mean_rank"].map(lambda v: _fmt(v, ".2f")),
        "Δ vs ce (points)": (100 * table["delta_vs_ce"]).map(lambda v: _fmt(v, "+.2f")),
        "beats ce": [f"{b}/{n}" if n else "–" for b, n in zip(table["beats_ce_blocks"], table["ce_blocks"])],
        "Δ vs ce, untrained teacher": (100 * table["delta_vs_ce_untrained"]).map(lambda v: _fmt(v, "+.2f")),
        "p (Holm), untrained": table["p_vs_ce_untrained_holm"].map(lambda v: _fmt(v, ".3g")),
        "gain from": table["gain_from"]})


def display_blocks(blocks: list[Block]) -> pd.DataFrame:
    return pd.DataFrame([{"id": f"B{i}", "block": b.name, "teacher val acc": _fmt(b.teacher_val_acc, ".4f"),
                          "methods": str(len(b.accs)), "seeds": "/".join(sorted({str(len(a)) for a in b.accs.values()})),
                          "best": max(b.accs, key=b.mean)} for i, b in enumerate(blocks, 1)])


def display_deltas(blocks: list[Block], methods: list[str]) -> pd.DataFrame:
    """Each method's Δ vs ce in each block, in points (columns: the block ids of display_blocks; '–': not there)."""
    rows = []
    for m in methods:
        row = {"method": m}
        for i, b in enumerate(blocks, 1):
            ok = m in b.accs and REFERENCE in b.accs
            row[f"B{i}"] = _fmt(100 * (b.mean(m) - b.mean(REFERENCE)), "+.2f") if ok else "–"
        rows.append(row)
    return pd.DataFrame(rows)


def _sections(result: Across) -> dict[str, pd.DataFrame]:
    """The report's tables, by heading, as markdown and report.html show them."""
    return {"Ranking over blocks": display(result.table), "Blocks": display_blocks(result.blocks),
            "Δ vs ce per block (points)": display_deltas(result.blocks, result.table["method"].tolist())}


def to_markdown(result: Across, where: str) -> str:
    from kdsweep.report.build import markdown_table

    lines = ["# kdsweep report --across: ranks over blocks", "", where, ""]
    for heading, df in _sections(result).items():
        lines += [f"## {heading}", "", markdown_table(df), ""]
    lines += [f"- {n}" for n in result.notes]
    return "\n".join(lines).rstrip() + "\n"


def write(result: Across, out: Path, formats: list[str], where: str, plots: bool) -> list[Path]:
    """blocks.csv always (the numbers to recompute the test from), then the table in each format, the diagram and
    report.html."""
    from kdsweep.report.page import render_across

    files = [out / "blocks.csv"]
    result.frame.to_csv(files[0], index=False)
    for fmt in formats:
        path = out / ("report.html" if fmt == "html" else f"across.{fmt}")
        if fmt == "csv":
            result.table.to_csv(path, index=False)
        elif fmt == "json":
            path.write_text(result.table.to_json(orient="records", indent=2))
        elif fmt == "md":
            path.write_text(to_markdown(result, where))
        elif fmt == "tex":
            path.write_text(display(result.table).to_latex(index=False, escape=True).replace("Δ", r"$\Delta$")
                            .replace("–", "--"))
        if fmt != "html":
            files.append(path)
    pngs = [diagram(result, out / "plots" / "cd_diagram.png")] if plots and result.mean_ranks else []
    files += pngs
    if "html" in formats:
        page = render_across("kdsweep report --across: ranks over blocks", where,
                             _sections(result),
                             result.notes, pngs)
        (out / "report.html").write_text(page, encoding="utf-8")
        files.append(out / "report.html")
    return files


def diagram(result: Across, path: Path) -> Path:
    from kdsweep.report import plots

    n = len([b for b in result.blocks if not b.control])
    p = "" if math.isnan(result.p) else f", Friedman p = {result.p:.3g}"
    return plots.cd_diagram(result.mean_ranks, result.groups, result.cd, path, f"mean rank over {n} blocks{p}")


def _across_file(name: str) -> bool:
    """The files an --across report writes: what a marker from before markers listed can vouch for."""
    return name in ("blocks.csv", "report.html") or name.startswith(("across.", "plots/"))


def run_across(tracking_uri: str | None = None, formats: list[str] | None = None, out: str | None = None,
               plots: bool = True, say: Say = print, show=print, overwrite: bool = False) -> Across:
    """`kdsweep report --across`: every block of the store, ranked; printed as markdown, written to `out`."""
    from kdsweep.common.uris import redact

    if formats and not out:
        raise UserError("--format needs --out DIR (without it the report is printed as markdown)")
    if out:
        atomic.check_out(Path(out), _across_file, overwrite)
    tracker = open_tracker(tracking_uri)
    blocks, notes = collect(tracker)
    result = analyse(blocks, notes)
    where = f"{len(blocks)} blocks from the MLflow store at {redact(tracker.uri)}"
    show(to_markdown(result, where))
    if out:
        with atomic.atomic_dir(Path(out), _across_file, overwrite) as out_dir:
            files = write(result, out_dir, formats or ["md", "csv", "html"], where, plots)
        say(f"wrote {len(files)} files to {out}")
    return result


def confirm_across(tracking_uri: str | None, seeds: int, device: str = "auto", data_dir: str | None = None,
                   say: Say = print, **speed) -> dict[str, dict[str, dict[str, int]]]:
    """`kdsweep confirm --across`: every block's studies confirmed with `seeds` seeds (a shared ce study once);
    `speed`: confirm's cpu_workers and quiet."""
    from kdsweep.report.confirm import confirm
    from kdsweep.training.devices import resolve_device

    tracker, dev, done, out = open_tracker(tracking_uri), resolve_device(device), set(), {}
    for sel in selections(tracker):
        sel.studies = [s for s in sel.studies if s.name not in done]
        done.update(s.name for s in sel.studies)
        if sel.studies:  # else: only shared studies, confirmed with an earlier block
            per_trial = next((s.per_trial for s in sel.studies if s.uses_teacher), sel.studies[0].per_trial)
            block = f"{sel.dataset} {sel.teacher}->{sel.student} s{sel.seed} {per_trial}"
            say(f"block {block}: {', '.join(s.label for s in sel.studies)}")
            out[block] = confirm(sel, seeds, dev, data_dir, say, **speed)
    return out
