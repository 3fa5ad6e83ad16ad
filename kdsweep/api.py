"""kdsweep from Python (notebooks): the same studies, sweeps, confirmations and reports as the command line.

    import kdsweep.api as kd

    result = kd.sweep(["ce", "vanilla_kd"], dataset="digits", epochs=5, budget_epochs=40)
    result.confirm(seeds=3)             # kd.confirm(seeds=3, dataset="digits") the same
    tables = result.report()            # {"best": DataFrame, "ranking": DataFrame, ...}

Settings are `kdsweep study`'s flags as keyword arguments (`budget_epochs=40` for
`--budget-epochs 40`), checked against the one schema, `settings.StudySettings`. Models and data
may also be Python objects: see `teacher`, `student` and `data` in :func:`study`.
The command line is a thin layer over these functions.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from kdsweep.common.errors import UserError

if TYPE_CHECKING:  # pandas is imported where tables are made: not before a study's first trial (0.6 s)
    import pandas as pd


def settings() -> list[str]:
    """The keyword arguments study() and sweep() accept: the settings of the schema (study/settings.py)."""
    from kdsweep.study.settings import names

    return names()


def _flags(given: Mapping[str, Any]) -> dict[str, Any]:
    known = settings() + ["data"]
    bad = sorted(set(given) - set(known))
    if bad:
        raise UserError(f"unknown setting(s) {', '.join(bad)}; known: {', '.join(known)}")
    return {k: v for k, v in given.items() if v is not None}


def _specs(flags: dict[str, Any]) -> dict[str, Any]:
    """Python objects given for teacher, student or data, named so a StudyConfig can hold them (naming.py)."""
    from kdsweep.study import naming

    return naming.name_all(flags)


class StudyResult:
    """A finished (or resumed) study: its summary, as the CLI prints it, and every trial as a DataFrame."""

    def __init__(self, summary: dict[str, Any], cfg: Any):
        self.summary, self._cfg = summary, cfg

    @functools.cached_property
    def trials(self) -> pd.DataFrame:
        """Every trial of the study, read from its Optuna store when first asked for: the command line never asks,
        and making the frame (pandas, the store opened again) was most of a finished command's last second."""
        return _trials_frame(self._cfg)

    @property
    def best(self) -> dict[str, Any] | None:
        return self.summary["best"]

    def __repr__(self) -> str:
        s = self.summary
        best = f", best val_acc {s['best']['val_acc']:.4f}" if s["best"] else ""
        return (f"StudyResult({s['study']!r}: {s['complete']} complete, {s['pruned']} pruned, {s['failed']} failed, "
                f"{s['epochs']} epochs{best})")


def _trials_frame(cfg) -> pd.DataFrame:
    import optuna

    from kdsweep.study.optuna_storage import open_storage

    study = optuna.load_study(study_name=cfg.full_study_name, storage=open_storage(cfg.storage))
    df = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs", "duration"))
    names = {"value_val_acc": "val_acc", "value": "val_acc", "user_attrs_test_acc": "test_acc",
             "user_attrs_best_epoch": "best_epoch", "user_attrs_kdsweep.epochs_trained": "epochs",
             "user_attrs_mlflow_run_id": "mlflow_run_id"}
    df = df.rename(columns={**names, **{c: c[len("params_"):] for c in df.columns if c.startswith("params_")}})
    return df[[c for c in df.columns if not c.startswith("user_attrs_")]]


def study(method: str, *, quiet: bool = True, reporter=None, **settings_: Any) -> StudyResult:
    """Run or resume the Optuna study of one method (a method name, or a study file by its path), as `kdsweep study`.

    teacher, student: a name (`kdsweep methods` lists the built-ins), a spec (`torchvision:resnet18`,
        `timm:NAME`, `package.module:factory`), an `nn.Module` (a teacher: used as it is, trained; a
        student: copied for each trial) or a callable `factory(num_classes)` returning one.
    data: tensors or arrays `(train_x, train_y, test_x, test_y)` or a dict with those keys, in place of
        `dataset`; or `dataset` itself: a built-in name or a spec (`imagefolder:PATH`, `torchvision:NAME`,
        `package.module:callable`).
    Returns the summary and the study's trials.
    """
    from kdsweep.study.config import resolve
    from kdsweep.study.loop import run_study
    from kdsweep.study.progress import Reporter

    cfg = resolve(method, _specs(_flags(settings_)))
    summary = run_study(cfg, reporter=reporter or Reporter.auto(quiet))
    return StudyResult(summary, cfg)


@dataclass
class SweepResult:
    studies: dict[str, StudyResult]  # method label -> its study
    skipped: dict[str, str]  # method -> why the pair cannot serve it
    pair: dict[str, Any]  # dataset, teacher, student, seed, per-trial settings: what confirm() and report() select by

    def confirm(self, seeds: int = 3, **kw: Any) -> pd.DataFrame:
        """:func:`confirm` for this sweep's own studies (a store may hold other methods and pairs)."""
        return confirm(seeds, **{**self.pair, "studies": self._names(), **kw})

    def report(self, **kw: Any) -> dict[str, pd.DataFrame]:
        """:func:`report` of this sweep's own studies."""
        return report(**{**self.pair, "studies": self._names(), **kw})

    def _names(self) -> list[str]:
        return [r.summary["study"] for r in self.studies.values()]

    @property
    def table(self) -> pd.DataFrame:
        """One row per method: its best trial and what the study spent."""
        rows = []
        for label, r in self.studies.items():
            s, b = r.summary, r.summary["best"] or {}
            rows.append({"method": label, "val_acc": b.get("val_acc"), "test_acc": b.get("test_acc"),
                         "complete": s["complete"], "pruned": s["pruned"], "failed": s["failed"], "epochs": s["epochs"],
                         "study": s["study"]})
        import pandas as pd

        return pd.DataFrame(rows).sort_values("val_acc", ascending=False, na_position="last").reset_index(drop=True)

    def __repr__(self) -> str:
        return f"SweepResult({len(self.studies)} studies)\n{self.table.to_string(index=False)}"


def plan_sweep(methods: Sequence[str] | str, study_suffix: str | None = None, say: Callable[[str], None] = print,
               **settings_: Any) -> tuple[list, dict[str, str]]:
    """The sweep's study configs, every one checked (names, equal budgets, no conflicting study) before any training."""
    from kdsweep.data.dispatch import get_dataset
    from kdsweep.methods.registry import METHODS
    from kdsweep.study.config import DEFAULT_TRIALS, resolve
    from kdsweep.study.optuna_storage import open_storage
    from kdsweep.study.pairs import pair_problem, study_conflict
    from kdsweep.training.devices import prepare_cpu, resolve_device

    names = [n.strip() for n in methods.split(",")] if isinstance(methods, str) else list(methods)
    names = [n for n in names if n]
    every = names == ["all"]
    if every:
        names = ["ce"] + sorted(n for n in METHODS if n != "ce")
    elif not names or "all" in names:
        raise UserError("--methods takes `all` or a comma-separated list of methods/study files")
    flags = _specs(_flags(settings_))
    configs = [resolve(n, flags) for n in names]  # every name checked before any training
    device = resolve_device(configs[0].device)  # `--device cuda` without one: said before any study is planned or announced
    if device.type == "cpu":  # the process's threads set before the pair checks below run torch
        prepare_cpu(default=get_dataset(configs[0].dataset).cpu_threads)
    for cfg in configs:
        if flags.get("trials") is None and flags.get("budget_epochs") is None and cfg.trials == DEFAULT_TRIALS \
                and cfg.budget_epochs is None:
            cfg.trials, cfg.budget_epochs = None, DEFAULT_TRIALS * cfg.epochs  # equal compute, however much each prunes
        if study_suffix:
            cfg.study_name = f"{cfg.full_study_name}-{study_suffix}"
    budgets = {f"{c.name}: {c.budget.describe()} of {c.epochs}-epoch trials" for c in configs}
    if len({(c.budget, c.batch_size) for c in configs}) > 1:
        raise UserError("the sweep's methods would get different budgets (from their study files): " + "; ".join(sorted(budgets))
                        + "; pass --trials/--budget-epochs/--epochs to give all the same")
    runnable, skipped = [], {}
    for cfg in configs:
        why = pair_problem(cfg)
        if why and not every:
            raise UserError(why)
        if why:
            skipped[cfg.name] = why
            say(f"skipping {cfg.name}: {why}")
        else:
            runnable.append(cfg)
    # Every study checked before anything trains: a sweep never trains half its methods and then stops.
    storage = open_storage(configs[0].storage)
    conflicts = [why for why in (study_conflict(cfg, storage) for cfg in runnable) if why]
    for why in conflicts:
        print(f"kdsweep: conflict: {why}", file=sys.stderr)
    if conflicts:
        raise UserError(f"{len(conflicts)} of the sweep's studies exist with other settings; nothing was trained "
                        f"(use their original settings, or --study-suffix NEW for a new set of studies)")
    return runnable, skipped


def sweep(methods: Sequence[str] | str = "all", *, study_suffix: str | None = None, quiet: bool = True,
          on_study: Callable[[int, int, Any], None] | None = None, on_done: Callable[[dict], None] | None = None,
          **settings_: Any) -> SweepResult:
    """One study per method with the same split, stream, epochs and budget, run together, as `kdsweep sweep`.

    The default budget is 20 x epochs per method, counted in epochs (`budget_epochs`), so methods
    that prune more try more configurations for the same compute. Settings as :func:`study`.
    """
    from kdsweep.study.loop import run_studies
    from kdsweep.study.progress import Reporter

    say = (lambda _: None) if quiet else print
    runnable, skipped = plan_sweep(methods, study_suffix, say, **settings_)
    # The per-trial tag a report selects by: a teacher-using study's, which names its teacher seed (ce's never does)
    first = next((c for c in runnable if c.teacher_tag), runnable[0] if runnable else None)
    pair = {} if first is None else {"dataset": first.dataset, "teacher": first.teacher, "student": first.student,
                                     "seed": first.seed, "tracking_uri": first.tracking_uri, "per_trial": first.budget_tag}
    for i, cfg in enumerate(runnable, 1):
        if on_study:
            on_study(i, len(runnable), cfg)
    # The studies run together: their trials share lockstep groups, the stores, data and teacher (loop.run_studies).
    summaries = run_studies(runnable, reporter=Reporter.auto(quiet)) if runnable else []
    results = {}
    for cfg, summary in zip(runnable, summaries):
        if on_done:
            on_done(summary)
        results[cfg.name] = StudyResult(summary, cfg)
    return SweepResult(results, skipped, pair)


def sweep_teacher_seeds(methods: Sequence[str] | str = "all", teacher_seeds: Sequence[int] = (0,), **kw: Any) -> dict[int, SweepResult]:
    """:func:`sweep` once per teacher seed (`kdsweep sweep --teacher-seeds 0,1,2`): each teacher its own block, on
    the same split and student seeds; a teacher-free method (ce) is one study that every block shares."""
    if "teacher_seed" in kw:
        raise UserError("give teacher seeds as teacher_seeds=[...] (--teacher-seeds), not also teacher_seed")
    return {int(t): sweep(methods, teacher_seed=int(t), **kw) for t in dict.fromkeys(teacher_seeds)}


def confirm(seeds: int = 3, *, dataset: str | None = None, teacher: str | None = None, student: str | None = None,
            seed: int | None = None, studies: Sequence[str] | None = None, per_trial: str | None = None,
            device: str = "auto", data_dir: str | None = None, tracking_uri: str | None = None,
            say: Callable[[str], None] = print, cpu_workers: int | None = None, quiet: bool = False) -> pd.DataFrame:
    """Retrain each method's best configuration with `seeds` fresh seeds (resumable), as `kdsweep confirm`.

    Returns one row per method: runs reused, trained and failed. `cpu_workers` as a study's; `quiet`: say only
    notes, warnings and failures.
    """
    from kdsweep.report.confirm import confirm as run_confirm
    from kdsweep.report.stored_studies import open_tracker, select
    from kdsweep.training.devices import resolve_device

    dev = resolve_device(device)
    sel = select(open_tracker(tracking_uri), dataset, _label(teacher), _label(student), seed, list(studies or []) or None,
                 per_trial)
    for note in sel.notes:
        say(f"note: {note}")
    summary = run_confirm(sel, seeds, dev, data_dir, say=say, cpu_workers=cpu_workers, quiet=quiet)
    import pandas as pd

    return pd.DataFrame([{"method": k, **v} for k, v in summary.items()])


def report(*, dataset: str | None = None, teacher: str | None = None, student: str | None = None, seed: int | None = None,
           studies: Sequence[str] | None = None, per_trial: str | None = None, seeds: int | None = None,
           formats: str | None = None, out: str | None = None, device: str = "auto", data_dir: str | None = None,
           tracking_uri: str | None = None, plots: bool = False, log: bool = True, quiet: bool = True,
           overwrite: bool = False, across: bool = False) -> dict[str, pd.DataFrame]:
    """The ranking tables of one teacher -> student pair, as `kdsweep report`; returns them as DataFrames.

    Keys: "best" (best trial per method), "metrics", "ranking" (mean, CI, p-values over confirmation
    seeds), "ranks". With `out` (and `formats`, e.g. "md,csv,html") the files are written too.
    `across=True` (`kdsweep report --across`): every block of the store instead of one pair; keys "across" (mean
    rank, Δ vs ce, where the gain comes from) and "blocks" (one row per block and method, as blocks.csv).
    """
    from kdsweep.report.build import parse_formats, run_report

    if across:  # every block of the store: the pair-choosing keywords do not apply (the CLI refuses them)
        from kdsweep.report.across import run_across

        say = (lambda _: None) if quiet else print
        result = run_across(tracking_uri, parse_formats(formats) if formats else None, out, plots, say=say,
                            show=say, overwrite=overwrite)
        return {"across": result.table, "blocks": result.frame}
    rep = run_report(tracking_uri, dataset, _label(teacher), _label(student), seed, list(studies or []) or None, formats, out,
                     seeds, device, data_dir, plots=plots, log=log, say=(lambda _: None) if quiet else print,
                     per_trial=per_trial, show=(lambda _: None) if quiet else print, overwrite=overwrite)
    return dict(rep.tables)


def confirm_across(seeds: int = 3, *, device: str = "auto", data_dir: str | None = None,
                   tracking_uri: str | None = None, say: Callable[[str], None] = print, cpu_workers: int | None = None,
                   quiet: bool = False) -> dict[str, dict]:
    """`kdsweep confirm --across`: every block of the store confirmed with `seeds` fresh seeds; {block: {label: counts}}."""
    from kdsweep.report.across import confirm_across as run

    return run(tracking_uri, seeds, device, data_dir, say, cpu_workers=cpu_workers, quiet=quiet)


def _label(model: Any) -> str | None:
    """A model given to report/confirm as the object it was studied with: the name it was stored under."""
    if model is None or isinstance(model, str):
        return model
    from kdsweep.study import naming

    return naming.model_name(model)
