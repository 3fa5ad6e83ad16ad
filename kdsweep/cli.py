"""The `kdsweep` command line: argparse subcommands, one-line errors, exit status 2 for bad input."""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import signal
import sys
import threading
from typing import Callable

from kdsweep.common import collector, failures
from kdsweep.common.errors import UserError
from kdsweep.data.catalog import DATASET_NAMES
from kdsweep.study import local_workers
from kdsweep.study import settings as schema  # torch-free: the settings' flags come from it

EPILOG_STUDY = """\
examples:
  kdsweep study vanilla_kd --trials 50                      # CIFAR-10, ResNet-18 -> SmallNet
  kdsweep study vanilla_kd --dataset digits --trials 10 --epochs 5
  kdsweep study ce --dataset digits --trials 10 --epochs 5  # the baseline to beat
  kdsweep study studies/my_kd.toml --device cuda            # a study file
  kdsweep study vanilla_kd --trials 48 --parallel 8         # 8 trials at a time, one teacher pass
  kdsweep study dkd --dataset digits --budget-epochs 100 --epochs 5   # 100 epochs of compute, pruned trials included

NAME is a method (`kdsweep methods` lists them), run with its own search ranges,
or a study file given by its path (a .toml, e.g. studies/NAME.toml): a bare name
never reads a file. Precedence: built-in defaults < study file < flags.

The budget counts compute: --trials N is N trials that trained, whatever their
end (complete, pruned by the pruner, or diverged); --budget-epochs E is E epochs
summed over all trials, so pruning buys more configurations for the same compute.
Trials lost to a killed worker are retried and not counted. Running the same
command again resumes the study up to its budget; a larger budget adds the rest.
What one trial computes (epochs, batch size, optimiser settings, data size, val
fraction) is part of the study's name: other values are another study.

Each trial trains the student with the dataset's optimiser (SGD with momentum;
mnist1d: Adam; --optimizer to choose), weight decay and a per-step cosine lr on
the training split, reports validation accuracy to Optuna after every
epoch (so the pruner can stop bad trials) and logs everything to MLflow: one
parent run per study, one child run per trial. The test split is evaluated once
per complete trial, at its best-validation epoch, and never used for tuning.
"""


def _add_settings(p: argparse.ArgumentParser, names: list[str], defaults: dict[str, str] | None = None) -> dict:
    """Flags for these settings of the schema (study/settings.py): flag, type, choices and help with its default, in
    the schema's groups; returns the groups by title. defaults: a command's own words for a setting's default."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in schema.schema(names):
        title = f.metadata["group"]
        if title not in groups:
            groups[title] = p.add_argument_group(title)
        kw = {"help": schema.help_text(f, (defaults or {}).get(f.name)), "metavar": f.metadata["metavar"],
              "choices": list(f.metadata["choices"]) if f.metadata["choices"] else None}
        if schema.kind(f.name) is bool:
            kw["action"] = argparse.BooleanOptionalAction  # --compile / --no-compile
        else:
            kw["type"] = schema.kind(f.name)
        groups[title].add_argument(schema.flag(f.name), **{k: v for k, v in kw.items() if v is not None})
    return groups


def _help(name: str) -> str:
    """A setting's help, for a command that takes it outside the study flags (report, confirm, ui, teacher)."""
    return schema.help_text(schema.schema([name])[0])


def _study_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """Every setting of the schema as a flag (a sweep: --study-suffix instead of --study-name), then --quiet."""
    names = [n for n in schema.names() if not (sweep and n == "study_name")]
    defaults = {"trials": "none; the sweep's default budget is --budget-epochs",
                "budget_epochs": f"{schema.DEFAULT_TRIALS} x --epochs per method"} if sweep else {}
    groups = _add_settings(p, names, defaults)
    if sweep:
        groups[schema.SEARCH].add_argument(
            "--study-suffix", metavar="TEXT", help="appended to every study's name: a separate set of studies with the same settings")
        groups[schema.MODELS].add_argument(
            "--teacher-seeds", metavar="S,S,...", help="one sweep per teacher seed (as --teacher-seed), each its own "
            "block for `kdsweep report --across`; teacher-free methods (ce) run once and serve every block")
    _processes_arg(groups[schema.SPEED], "sharing the budget exactly (each with its own --parallel K; ")
    _output_args(p)


def _processes_arg(g, sharing: str) -> None:
    g.add_argument("--processes", type=int, default=1, metavar="N",
                   help=f"run this command as N worker processes on this machine, {sharing}on a CPU each gets cores/N "
                   "worker threads): on a CPU, processes do not wait for each other's GIL as threads do (default: 1)")


def _output_args(p: argparse.ArgumentParser,
                 title: str = "output (in a terminal: progress bars; otherwise one line per finished trial and study)") -> None:
    g = p.add_argument_group(title)
    g.add_argument("--quiet", "-q", action="store_true",
                   help="print only the summary at the end (notes and warnings still go to stderr)")


def _settings(args, *skip: str) -> dict:
    """The study settings given as flags: one per StudyConfig field (the schema; imported only when a command runs)."""
    from kdsweep.api import settings

    return {k: getattr(args, k, None) for k in settings() if k not in skip}


def _as_workers(args) -> int | None:
    """--processes N > 1: this command as N worker processes (study/local_workers.py); their exit status."""
    if args.processes < 1:
        raise UserError(f"--processes must be at least 1, not {args.processes}")
    if args.processes == 1:
        return None
    return local_workers.run(args.argv, args.processes, args.cpu_workers, args.quiet)


def cmd_study(args) -> int:
    if (code := _as_workers(args)) is not None:
        return code
    from kdsweep import api

    result = api.study(args.name, quiet=args.quiet, **_settings(args))
    print_summary(result.summary)
    return 0


def print_summary(s: dict) -> None:
    print(f"\nstudy {s['study']}: {s['complete']} complete, {s['pruned']} pruned, {s['failed']} failed "
          f"({s['trained']} trained, {s['epochs']} epochs; budget {s['budget']})")
    best = s["best"]
    if best:
        params = ", ".join(f"{k}={v:.4g}" for k, v in best["params"].items())
        print(f"  best trial #{best['number']}: val_acc={best['val_acc']:.4f} test_acc={best['test_acc']:.4f}  ({params})")
    elif s["failed"]:
        print("  no trial completed: every trial that trained failed (see the runs' kdsweep.reason tags); "
              "a narrower lr range in a study file may help")
    for line in s.get("edges", []):
        print(f"  note: {line}")
    print(f"  MLflow: experiment {s['experiment']!r}, parent run {s['parent_run']} at {s['tracking_uri']}")
    print("  browse: kdsweep ui", flush=True)


def cmd_sweep(args) -> int:
    """One study per method, run together, with the same split, stream, epochs and budget."""
    if (code := _as_workers(args)) is not None:
        return code
    from kdsweep import api

    def starting(i: int, n: int, cfg) -> None:
        if not args.quiet:
            print(f"[{i}/{n}] {cfg.name}: budget {cfg.budget.describe()}", flush=True)

    flags = _settings(args, "study_name")
    common = {"study_suffix": args.study_suffix, "quiet": args.quiet, "on_study": starting, "on_done": print_summary}
    if args.teacher_seeds is None:
        results = {None: api.sweep(args.methods, **common, **flags)}
    else:
        if args.teacher_seed is not None:
            raise UserError("--teacher-seeds runs one sweep per teacher seed: leave out --teacher-seed")
        flags.pop("teacher_seed")
        results = api.sweep_teacher_seeds(args.methods, _int_list(args.teacher_seeds, "--teacher-seeds"), **common,
                                          **flags)
    for teacher_seed, result in results.items():
        if args.quiet:
            for why in result.skipped.items():
                print("skipping {}: {}".format(*why))
        print(("\nsweep" if teacher_seed is None else f"\nsweep, teacher seed {teacher_seed}")
              + ", best val_acc per method (the objective; test_acc in each summary above): " + ", ".join(
            f"{s['study'].split('-')[0]}={s['best']['val_acc']:.4f}" if s["best"] else f"{s['study']}=no complete trial"
            for s in (r.summary for r in result.studies.values())))
    if args.teacher_seeds is not None:
        print("next: kdsweep confirm --across; kdsweep report --across")
        return 0
    # The pair named: a store holding another pair (the README's quick start on mnist1d) refuses a bare `report`.
    dataset = results[None].pair.get("dataset")
    words = ["--dataset", dataset] if dataset else []
    for flag, value in (("--teacher", args.teacher), ("--student", args.student)):
        words += [flag, value] if value else []
    # The tracking URI is not repeated: it may hold a password.
    print("next: kdsweep report " + shlex.join(words) + (" (with the same --tracking-uri)" if args.tracking_uri else ""))
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    """A comma list of integers, e.g. 0,1,2, or a one-line error naming the flag."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} takes a comma list of integers, e.g. 0,1,2; got {text!r}") from None
    if not values:
        raise UserError(f"{flag} takes a comma list of integers, e.g. 0,1,2; got {text!r}")
    return values


def cmd_methods(args) -> int:
    """The registry as a table: what each method is, what it reads, what it searches."""
    from kdsweep.common.space import LR_RANGES
    from kdsweep.methods.registry import METHODS
    from kdsweep.models.zoo import TAPS

    lr = "lr " + ", ".join(f"{v.describe()} ({opt})" for opt, v in LR_RANGES.items())
    rows = []
    for name in sorted(METHODS, key=lambda n: (n != "ce", n != "vanilla_kd", n)):
        m = METHODS[name]
        needs = "-" if not m.uses_teacher else ", ".join(t for t in TAPS if t in m.needs)
        needs += "; training-sample ids" if m.needs_index else ""  # issue 14: CRD's memory bank
        space = "; ".join([f"{k} {v.describe()}" for k, v in m.space.items()] + [lr])
        rows.append((name, m.summary, needs, space, m.reference))
    if args.format == "tsv":
        print("name\tdescription\tneeds\tsearch space\treference")
        for r in rows:
            print("\t".join(r))
        return 0
    for name, summary, needs, space, ref in rows:
        print(f"{name}\n    {summary}\n    needs: {needs}{'' if needs == '-' else ' (taps from teacher and student)'}\n    searches: {space}\n    reference: {ref}\n")
    print(f"{len(rows)} methods. Run one: kdsweep study NAME --dataset digits --trials 10")
    return 0


def cmd_teacher(args) -> int:
    import contextlib
    from pathlib import Path

    from kdsweep.data.device_data import check_split
    from kdsweep.data.dispatch import get_dataset, load_data
    from kdsweep.study.config import StudyConfig
    from kdsweep.tracking.tracker import Tracker
    from kdsweep.training.devices import prepare_cpu, resolve_device
    from kdsweep.training.teacher import cache_lock, cache_path, train_teacher

    if args.arch is None and args.dataset and ":" in args.dataset:
        raise UserError(f"dataset {args.dataset} has no default teacher: pass --arch (e.g. --arch torchvision:resnet18)")
    cfg = StudyConfig(method="ce", name="teacher", **{k: v for k, v in vars(args).items()
                                                       if k in ("dataset", "data_dir", "data_size", "image_size", "val_fraction", "seed",
                                                                "teacher_seed", "device", "tracking_uri", "preprocess")
                                                       and v is not None},
                      teacher=args.arch, student=args.arch, teacher_epochs=args.epochs)  # no student is trained
    device = resolve_device(cfg.device)
    if device.type == "cpu":  # as a study's teacher trains
        prepare_cpu(default=get_dataset(cfg.dataset).cpu_threads)
    tracker = Tracker(cfg.tracking_uri)
    data = load_data(cfg.dataset, cfg.data_dir, cfg.data_size, cfg.seed, cfg.val_fraction, device, image_size=cfg.image_size,
                     preprocess=cfg.preprocess)
    check_split(data, cfg.batch_size, cfg.val_fraction)
    path = Path(args.out) if args.out else cache_path(data.tag or cfg.dataset, cfg.teacher, cfg.resolved_teacher_seed,
                                                      cfg.teacher_epochs, cfg.data_size, cfg.val_fraction, cfg.seed,
                                                      preprocess=cfg.preprocess)
    # The cache lock: a study starting meanwhile waits for this teacher instead of training its own.
    with cache_lock(path) if not args.out else contextlib.nullcontext():
        if path.exists() and not args.force:
            print(f"teacher already cached at {path} (--force to retrain)")
            return 0
        train_teacher(cfg.dataset, cfg.teacher, cfg.resolved_teacher_seed, cfg.teacher_epochs, data, tracker, path,
                      batch_size=cfg.batch_size)  # it says which epoch it kept, and where
    return 0


EPILOG_REPORT = """\
examples:
  kdsweep report --dataset digits                           # markdown tables on the terminal
  kdsweep report --dataset digits --format md,csv,json --out R
  kdsweep report --dataset digits --seeds 3 --out R --format md,tex,html
  kdsweep report --tracking-uri http://127.0.0.1:5000 --dataset cifar10 --seed 0
  kdsweep report --across --out R        # every pair and teacher seed: mean ranks, Friedman, CD diagram

The report reads MLflow only (local SQLite store or a tracking server): for each
study of the chosen dataset, teacher -> student pair and seed it takes the best
trial (highest validation accuracy), downloads that trial's checkpoint and
evaluates it on the test split. Three tables: `best` (best trial per method,
trial counts, time), `metrics` (acc, NLL, 10-bin ECE, agreement with the
teacher, KL(teacher || student), cosine of logits, entropy; params, MACs,
ms/image) and `ranks` (rank per metric, average rank, difference to `ce`).

Once `kdsweep confirm` (or --seeds K here) has retrained each best config with
K fresh seeds, the metrics are mean ± sample std over those runs and `ranks`
adds a two-sided Welch t-test p-value of each method's test accuracy vs ce.
Tables go to --out DIR as best/metrics/ranks.{md,csv,tex,html,json} (plus
report.md; with html also report.html, one self-contained page with the tables,
notes and plots) and, with the plots (plots/*.png), to an MLflow run tagged
kdsweep.role=report. Progress and notes go to stderr, the markdown to stdout.
"""

EPILOG_CONFIRM = """\
examples:
  kdsweep confirm --dataset digits                  # 3 fresh seeds per method
  kdsweep confirm --dataset digits --seeds 5        # extends the 3 above by 2 more
  kdsweep confirm --dataset digits --studies ce,vanilla_kd --device cuda
  kdsweep confirm --across --seeds 5                # every block of the store, for report --across
  kdsweep confirm --dataset mnist1d --seeds 5 --processes 2   # 2 worker processes (a CPU)

For each study it retrains the best trial's hyperparameters with seeds
SEED+1 .. SEED+K: a fresh student initialisation and augmentation stream, the
same train/val/test split, the same teacher and the same epochs. Each run is an
MLflow child run of the study (tags kdsweep.role=confirm, kdsweep.confirm_seed,
kdsweep.source_run). Runs already COMPLETE for the current best trial are
reused, so an interrupted command resumes by running it again.
"""


def _report_select(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("which studies (default: the only pair and seed in the store)")
    g.add_argument("--dataset", help="dataset of the studies")
    g.add_argument("--teacher", help="teacher architecture (default: the dataset's pair)")
    g.add_argument("--student", help="student architecture (default: the dataset's pair)")
    g.add_argument("--seed", type=int, help="the studies' seed (default: the only one there)")
    g.add_argument("--studies", help="comma-separated study labels or names to include (default: all)")
    g.add_argument("--per-trial", metavar="SETTINGS",
                   help="the per-trial settings that end the studies' names, e.g. e5-b32: studies whose trials compute "
                        "something else are not compared (default: the settings of the studies that ran last; the others are named)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--device", choices=list(schema.DEVICES), default=schema.StudySettings.device,
                   help=f"where to evaluate the checkpoints (default: {schema.StudySettings.device})")
    g.add_argument("--data-dir", help=_help("data_dir"))
    g.add_argument("--tracking-uri", help=_help("tracking_uri"))


def _studies(args) -> list[str] | None:
    return [s.strip() for s in args.studies.split(",") if s.strip()] if args.studies else None


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def cmd_report(args) -> int:
    from kdsweep.report.build import run_report

    if args.across:
        from kdsweep import api

        api.report(across=True, tracking_uri=args.tracking_uri, formats=args.format, out=args.out,
                   plots=not args.no_plots, quiet=False, overwrite=args.overwrite, **_across_refusals(args))
        return 0
    run_report(args.tracking_uri, args.dataset, args.teacher, args.student, args.seed, _studies(args), args.format,
               args.out, args.seeds, args.device, args.data_dir, plots=not args.no_plots, log=not args.no_log, say=_stderr,
               per_trial=args.per_trial, overwrite=args.overwrite)
    return 0


def _across_refusals(args) -> dict:
    """--across reads every block of the store: the flags that choose one pair (or confirm first) do not apply."""
    given = [f for f in ("dataset", "teacher", "student", "seed", "studies", "per_trial", "seeds")
             if getattr(args, f, None) is not None and not (f == "seeds" and args.command == "confirm")]
    if given:
        raise UserError(f"--across takes every block of the store; {', '.join(schema.flag(f) for f in given)} "
                        f"choose one pair" + ("; run `kdsweep confirm --across --seeds K` first" if "seeds" in given else ""))
    return {}


def cmd_confirm(args) -> int:
    from kdsweep import api

    if (code := _as_workers(args)) is not None:
        return code
    speed = {"cpu_workers": args.cpu_workers, "quiet": args.quiet}
    if args.across:
        _across_refusals(args)
        for block, table in api.confirm_across(args.seeds, device=args.device, data_dir=args.data_dir,
                                               tracking_uri=args.tracking_uri, say=_stderr, **speed).items():
            for method, counts in table.items():
                print(f"{block}: {method}: {counts['reused']} reused, {counts['trained']} trained, {counts['failed']} failed")
        return 0

    table = api.confirm(args.seeds, dataset=args.dataset, teacher=args.teacher, student=args.student, seed=args.seed,
                        studies=_studies(args), per_trial=args.per_trial, device=args.device, data_dir=args.data_dir,
                        tracking_uri=args.tracking_uri, say=_stderr, **speed)
    for row in table.itertuples():
        print(f"{row.method}: {row.reused} reused, {row.trained} trained, {row.failed} failed")
    return 0


EPILOG_BENCH = """\
examples:
  kdsweep bench --device cpu                         # defaults: synthetic data, ResNet-18 -> SmallNet, K=8
  kdsweep bench --device cuda --images 45000 --epochs 10   # seed 003's trial size
  kdsweep bench --dataset cifar10 --images 4096 --trials 4

Runs, in one process and on the same data and models (teacher weights are
random: this measures speed, not accuracy), a seed-style reference trial
(per-sample torchvision transforms in a DataLoader, teacher forward every
step), one kdsweep trial, and a K-trial kdsweep study (lockstep trials, shared
teacher outputs). The last line is `speedup=X bound=Y`: X = wall time of K
reference trials / the kdsweep study's; Y = K(T+S)/(T+KS), the speedup that
sharing the teacher alone gives when time is proportional to multiply-adds
(T: teacher forward MACs per image, S: 3x the student's).
"""


def cmd_bench(args) -> int:
    from kdsweep.tools.bench import BenchConfig, run_bench

    given = {k: v for k, v in vars(args).items() if k in BenchConfig.__dataclass_fields__ and v is not None}
    run_bench(BenchConfig(**given))
    return 0


def cmd_ui(args) -> int:
    from kdsweep.common.uris import absolute_sqlite
    from kdsweep.tools.ui import serve
    from kdsweep.tracking.tracker import default_tracking_uri

    uri = absolute_sqlite(args.tracking_uri or default_tracking_uri())
    if uri.startswith("http"):
        raise UserError(f"{uri} is already a tracking server: open it in a browser")
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
        raise UserError(f"no MLflow store at {uri} yet: run a study first")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {args.host} exposes the MLflow UI, which has no login, to other machines", file=sys.stderr)
    return serve(uri, args.host, args.port, say=lambda m: print(m, flush=True))  # owns and stops every process it starts


def cmd_status(args) -> int:
    from kdsweep.report.status import as_json, collect, text

    status = collect(args.storage, args.tracking_uri)
    print(as_json(status) if args.json else text(status))
    return 0


EPILOG_SWEEP = f"""\
examples:
  kdsweep sweep --methods all --dataset digits --epochs 5       # 100 epochs per method
  kdsweep sweep --methods ce,vanilla_kd,dkd --budget-epochs 60 --epochs 5 --dataset digits
  kdsweep sweep --methods ce,vanilla_kd --trials 10 --epochs 3 --dataset digits --study-suffix try2
  kdsweep sweep --methods all --dataset mnist1d --parallel 16 --processes 2   # 2 worker processes (a CPU)

Every method gets the same budget: by default {schema.DEFAULT_TRIALS} trials' worth of epochs
(--budget-epochs {schema.DEFAULT_TRIALS} x --epochs), counted over all its trials, pruned ones
included, so a method that prunes more tries more configurations for the
same compute. Before anything trains, every method's study is checked: one
that exists with other settings stops the sweep (one line each, exit 2).
`all` runs every method whose needs the teacher/student pair can serve (ce
first) and says which it skips.
"""

Sub = argparse._SubParsersAction
RAW = argparse.RawDescriptionHelpFormatter


def _add_study(sub: Sub) -> None:
    p = sub.add_parser("study", help="run or resume an Optuna study of one method", description=cmd_study.__doc__ or
                       "Run (or resume) an Optuna study that tunes one distillation method.",
                       epilog=EPILOG_STUDY, formatter_class=RAW)
    p.add_argument("name", metavar="NAME", help="a method name, or a study file by its path (.toml)")
    _study_args(p)
    p.set_defaults(func=cmd_study)


def _add_sweep(sub: Sub) -> None:
    p = sub.add_parser("sweep", help="one study per method, same budget for each", formatter_class=RAW,
                       description="Run (or resume) one study per method, together, with the same data split, "
                                   "augmentation stream, epochs and trial budget, so the methods compare fairly.",
                       epilog=EPILOG_SWEEP)
    p.add_argument("--methods", default="all",
                   help="`all` or a comma list of methods / study files by path (default: all)")
    _study_args(p, sweep=True)
    p.set_defaults(func=cmd_sweep)


def _add_methods(sub: Sub) -> None:
    p = sub.add_parser("methods", help="list the distillation methods and their search spaces",
                       description="List every registered distillation method: what it does, what it needs from the "
                                   "models, what it searches (change a range in a study file: kdsweep study "
                                   "studies/NAME.toml), and where it comes from.")
    p.add_argument("--format", choices=["text", "tsv"], default="text")
    p.set_defaults(func=cmd_methods)


def _add_teacher(sub: Sub) -> None:
    p = sub.add_parser("teacher", help="train and cache a teacher", formatter_class=RAW,
                       description="Train a teacher with cross-entropy, keep its best-validation epoch and cache it, keyed "
                                   "by (dataset, arch, seed, epochs, data size). Studies reuse the cached teacher.",
                       epilog="examples:\n  kdsweep teacher --dataset digits --arch digitnet_l --epochs 30\n"
                              "  kdsweep teacher --dataset cifar10 --arch resnet18 --epochs 100 --device cuda")
    _add_settings(p, schema.in_group(schema.DATA))
    p.add_argument("--teacher-seed", type=int, help=_help("teacher_seed"))
    p.add_argument("--arch", help="teacher architecture (default: the dataset's teacher)")
    p.add_argument("--epochs", type=int, help="training epochs (default: per dataset)")
    p.add_argument("--out", help="write the checkpoint here instead of the cache")
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    p.add_argument("--tracking-uri", help=_help("tracking_uri"))
    p.set_defaults(func=cmd_teacher)


def _add_report(sub: Sub) -> None:
    p = sub.add_parser("report", help="tables (and plots) ranking the methods of one teacher -> student pair",
                       description="Build the best-per-method, metrics and rank tables of a pair's studies from MLflow.",
                       epilog=EPILOG_REPORT, formatter_class=RAW)
    _report_select(p)
    g = p.add_argument_group("output")
    g.add_argument("--format", help="comma-separated: md,csv,tex,html,json (needs --out; default: markdown on the terminal)")
    g.add_argument("--out", help="directory for the table files and plots/; replaced when it holds only an earlier "
                                 "report, refused when it holds other files")
    g.add_argument("--overwrite", action="store_true", help="write into an --out that holds other files: same names "
                                                          "are replaced, nothing else is removed")
    g.add_argument("--seeds", type=int, help="first confirm every method with K fresh seeds (as `kdsweep confirm --seeds K`), "
                                             "then report mean ± std over them")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--across", action="store_true",
                   help="rank the methods over every block of the store (pair, seed, teacher seed) with confirmed seeds: "
                        "mean ranks, Friedman test, Nemenyi critical difference and its diagram; blocks.csv holds the "
                        "numbers (with --out: md,csv,html unless --format says)")
    g.add_argument("--no-log", action="store_true", help="do not log the report as an MLflow run")
    p.set_defaults(func=cmd_report)


def _add_confirm(sub: Sub) -> None:
    p = sub.add_parser("confirm", help="retrain each method's best config with fresh seeds (resumable)",
                       description="Retrain the best trial of every study with K fresh seeds, logged as MLflow child runs.",
                       epilog=EPILOG_CONFIRM, formatter_class=RAW)
    _report_select(p)
    p.add_argument("--seeds", type=int, default=3, help="confirmation seeds per method (default: 3)")
    p.add_argument("--across", action="store_true",
                   help="confirm every block of the store (each pair, seed and teacher seed), as `report --across` reads them")
    g = p.add_argument_group("speed")
    g.add_argument("--cpu-workers", type=int, metavar="N", help=_help("cpu_workers"))
    _processes_arg(g, "sharing out every seed's runs (")
    _output_args(p, "output (on stderr: a line per study and per seed trained; on stdout: the table)")
    p.set_defaults(func=cmd_confirm)


def _add_bench(sub: Sub) -> None:
    p = sub.add_parser("bench", help="measure kdsweep's training path against a seed-style reference",
                       description="Benchmark a K-trial kdsweep study against K seed-style reference trials.",
                       epilog=EPILOG_BENCH, formatter_class=RAW)
    p.add_argument("--dataset", help=f"one of {', '.join(DATASET_NAMES)} (default: synthetic, generated: no network)")
    p.add_argument("--data-dir", help=_help("data_dir"))
    p.add_argument("--teacher", help="teacher architecture (default: resnet18, seed 003's)")
    p.add_argument("--student", help="student architecture (default: smallnet, seed 003's)")
    p.add_argument("--images", type=int, help="training images per epoch (default: 1024)")
    p.add_argument("--epochs", type=int, help="epochs per trial (default: 3)")
    p.add_argument("--trials", type=int, help="K, trials in the kdsweep study (default: 8)")
    p.add_argument("--batch-size", type=int, help="default: 128")
    p.add_argument("--device", choices=list(schema.DEVICES), help=_help("device"))
    p.add_argument("--workers", type=int, help="DataLoader workers of the reference (default: 0 on CPU, the fastest "
                                               "there; cores - 1, at most 4, on CUDA)")
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default: the cores this process may use)")
    p.add_argument("--parallel", type=int, help="trials per lockstep group in the kdsweep study (default: all K)")
    p.add_argument("--ref-trials", type=int, help="reference trials to measure and average (default: 1)")
    p.add_argument("--teacher-cache-mb", type=float, help="teacher cache budget of the study (default: sized to the device)")
    p.set_defaults(func=cmd_bench)


def _add_ui(sub: Sub) -> None:
    p = sub.add_parser("ui", help="open the MLflow UI on the study results",
                       description="Start `mlflow ui` on kdsweep's tracking store and print the link to the newest "
                                   "experiment's runs. Ctrl-C, `kill` or closing the terminal stops the server and every "
                                   "process it started; a port already in use is refused (exit 2).",
                       epilog="example:\n  kdsweep ui                 # then open the runs link it prints\n"
                              "  kdsweep ui --port 5001     # when 5000 is taken",
                       formatter_class=RAW)
    p.add_argument("--tracking-uri", help=_help("tracking_uri"))
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)


def _add_status(sub: Sub) -> None:
    p = sub.add_parser("status", help="the studies in a store: budget, trials by state, best, a worker running now",
                       description="List the studies of an Optuna storage: method, per-trial settings, budget, trials by "
                                   "state, epochs spent, best validation and test accuracy, whether a worker is running "
                                   "the study now, and its MLflow experiment and parent run. Reads only.",
                       epilog="examples:\n  kdsweep status\n  kdsweep status --json | jq '.studies[].best'\n"
                              "  kdsweep status --storage postgresql://user@host/db --tracking-uri http://127.0.0.1:5000",
                       formatter_class=RAW)
    _add_settings(p, schema.in_group(schema.TRACKING))
    p.add_argument("--json", action="store_true", help="the same as JSON")
    p.set_defaults(func=cmd_status)


def build_parser() -> argparse.ArgumentParser:
    """`kdsweep` and its subcommands; the study settings' flags come from the schema (study/settings.py)."""
    parser = argparse.ArgumentParser(
        prog="kdsweep",
        description="Tune knowledge-distillation methods fairly: one Optuna study per method, every trial tracked in MLflow.",
        formatter_class=RAW,
        epilog="start here:\n  kdsweep study vanilla_kd --dataset digits --trials 10 --epochs 5\n"
               "  kdsweep study ce --dataset digits --trials 10 --epochs 5\n"
               "  kdsweep confirm --dataset digits --seeds 3\n  kdsweep report --dataset digits --out R --format md,csv\n"
               "  kdsweep ui\n  kdsweep status\n\n"
               "`kdsweep COMMAND --help` explains each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_study, _add_sweep, _add_methods, _add_teacher, _add_report, _add_confirm, _add_bench, _add_ui,
                _add_status):
        add(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a preempted machine, `kill`): cleaned up like Ctrl-C."""


def _on_signal(signum, frame):
    from kdsweep.study.workers import request_stop

    exc = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    request_stop(exc)  # raised again at the next check, should this one be swallowed
    raise exc()


def _quiet_lost_interrupts(hook):
    """An unraisable-exception hook that stays silent about interrupts lost in GC callbacks (re-raised later)."""
    def unraisable(info):
        if isinstance(info.exc_value, KeyboardInterrupt):
            return
        hook(info)
    return unraisable


def _install_signal_handlers() -> dict:
    """Ctrl-C and SIGTERM both raise (and leave a stop request); returns what to restore."""
    from kdsweep.study.workers import request_stop

    request_stop(None)
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _on_signal), "unraisablehook": sys.unraisablehook}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started with SIGINT ignored (nohup, &)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_signal)
    sys.unraisablehook = _quiet_lost_interrupts(sys.unraisablehook)
    return previous


RESUMABLE = ("study", "sweep", "confirm")  # the commands that go on where they stopped; `bench` or `teacher` start again


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]  # what --processes hands its workers
    func: Callable = args.func
    previous = _install_signal_handlers()
    failures.forget()
    try:
        return func(args) or 0
    except UserError as e:
        print(f"kdsweep: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # A full disk, a corrupt or read-only store, a permission: one line; anything else is a bug (traceback).
        msg = failures.explain(e)
        if msg is None:
            raise
        print(f"kdsweep: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        then = "; run the same command again to resume" if args.command in RESUMABLE else ""
        print(f"\nkdsweep: {what}{then}.", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        sys.unraisablehook = previous.pop("unraisablehook", sys.unraisablehook)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def release() -> None:
    """Ready this process to exit quickly once a command is done (entry; benchmarks that run main() do the same).

    Everything is closed and flushed by then but the stores' idle connections. Python's exit would then walk every
    object torch, mlflow and sqlalchemy made, several times: about 1 s a process on 2 cores (each of --processes
    N workers pays it). Frozen, they are freed without the walk (atexit handlers still run)."""
    stores = sys.modules.get("kdsweep.common.sqlite_stores")  # loaded only by a command that opened a store
    if stores is not None:
        stores.close_all()
    gc.freeze()


def entry() -> None:
    """The `kdsweep` command: main(), and its status as the process's exit status."""
    collector.pause()  # until training starts (common/collector.py)
    code = main()
    release()
    if code in (130, 143):
        # CPython remembers a KeyboardInterrupt that once passed through code run by PyRun_* (as pybind11's
        # exec does), even one handled since, and at exit kills itself with SIGINT instead of returning our
        # status (a parent process sees -2, not 130). Exit directly: everything is closed and flushed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
