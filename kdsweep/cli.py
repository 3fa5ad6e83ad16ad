"""The `kdsweep` command line: argparse subcommands, one-line errors, exit status 2 for bad input."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Callable

from kdsweep.common import failures
from kdsweep.common.errors import UserError
from kdsweep.data.catalog import DATASET_NAMES

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


def _common_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and models")
    g.add_argument("--dataset", help=f"one of {', '.join(DATASET_NAMES)} (default: cifar10), or your data: imagefolder:PATH "
                                     f"(PATH/train/<class>/*.png and PATH/test/ or PATH/val/), torchvision:NAME (read from "
                                     f"--data-dir, never downloaded), package.module:function (returns train_x, train_y, "
                                     f"test_x, test_y); these need --teacher and --student")
    g.add_argument("--data-dir", help="where real datasets live / are downloaded (default: $KDSWEEP_DATA or ~/.cache/kdsweep/data)")
    g.add_argument("--image-size", type=int, metavar="N",
                   help="resize your dataset's images to NxN (shorter side, then centre crop); needed when its images "
                        "differ in size (default: as they are)")
    g.add_argument("--data-size", type=int, help="training images to use (synthetic: to generate; default: all, synthetic 5000)")
    g.add_argument("--val-fraction", type=float, help="share of the training set held out for validation (default: 0.1)")
    g.add_argument("--seed", type=int, help="seed of the split, augmentation stream, initialisation and sampler (default: 0)")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], help="default: auto (CUDA when there is one)")


def _common_tracking(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("storage and tracking")
    g.add_argument("--storage", help="Optuna storage URL (default: sqlite:///mlruns/optuna.db; e.g. postgresql://user@host/db)")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlruns/mlflow.db; e.g. http://127.0.0.1:5000)")


def _study_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    from kdsweep.methods.space import OPTIMIZERS

    _common_data(p)
    g = p.add_argument_group("models")
    g.add_argument("--teacher", metavar="MODEL", help="teacher: a built-in name, torchvision:NAME, timm:NAME or "
                                                       "package.module:factory (default: the dataset's pair)")
    g.add_argument("--student", metavar="MODEL", help="student, as --teacher (default: the dataset's pair)")
    for role in ("teacher", "student"):
        g.add_argument(f"--{role}-feature", metavar="PATH",
                       help=f"module whose output is the {role}'s feature map, e.g. layer4 (default: the last module "
                            f"that yields a spatial map)")
        g.add_argument(f"--{role}-embedding", metavar="PATH",
                       help=f"module whose input is the {role}'s embedding, e.g. fc (default: the last nn.Linear)")
    g.add_argument("--teacher-epochs", type=int, help="epochs of a teacher trained when none is cached (default: per dataset)")
    g.add_argument("--teacher-checkpoint", help="use this teacher checkpoint instead of the cache: kdsweep's, a plain "
                                                "state_dict or {\"state_dict\"/\"model\": ...} for --teacher "
                                                "(always loaded with weights_only=True)")
    g = p.add_argument_group("budget (the same for every method)")
    g.add_argument("--trials", type=int, metavar="N",
                   help="trials that trained (complete, pruned or diverged; trials lost to a killed worker are retried "
                        "and not counted) the study should hold; a rerun with a larger N adds the difference "
                        + ("(default: none; the sweep's default budget is --budget-epochs)" if sweep else
                           "(default: 20, or no limit when --budget-epochs is given)"))
    g.add_argument("--budget-epochs", type=int, metavar="E",
                   help="training epochs summed over all the study's trials; no trial is claimed once they are spent "
                        "(pruning then buys more configurations for the same compute: the fair unit for comparing "
                        "methods) " + ("(default: 20 x --epochs per method)" if sweep else "(default: none)"))
    g.add_argument("--epochs", type=int, help="epochs per trial (default: per dataset, e.g. digits 10)")
    g.add_argument("--batch-size", type=int, help="default: per dataset (digits 32, mnist1d 100, others 128)")
    g.add_argument("--optimizer", choices=list(OPTIMIZERS),
                   help="default: per dataset (sgd; mnist1d: adam, the paper's); sets the searched lr range (kdsweep methods)")
    g.add_argument("--momentum", type=float, help="SGD momentum, or Adam's/AdamW's beta1 (default: 0.9)")
    g.add_argument("--weight-decay", type=float, help="default: per dataset (5e-4; mnist1d: 0)")
    g.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    g = p.add_argument_group("search")
    g.add_argument("--sampler", choices=["tpe", "random"], help="default: tpe")
    g.add_argument("--pruner", choices=["median", "hyperband", "none"], help="default: median")
    if sweep:
        g.add_argument("--study-suffix", metavar="TEXT",
                       help="appended to every study's name: a separate set of studies with the same settings")
    else:
        g.add_argument("--study-name", help="Optuna study name (default: NAME-dataset-teacher-student-sSEED-eEPOCHS-bBATCH, "
                                            "plus any non-default optimizer, momentum, weight decay, data size or val fraction)")
    _perf_args(p)
    _common_tracking(p)
    _integrity_args(p)
    _output_args(p)


def _output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output (in a terminal: progress bars; otherwise one line per finished trial and study)")
    g.add_argument("--quiet", "-q", action="store_true",
                   help="print only the summary at the end (notes and warnings still go to stderr)")


def _integrity_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("integrity")
    g.add_argument("--on-mismatch", choices=["refuse", "repair", "ignore"],
                   help="when the study's Optuna trials and MLflow runs disagree at start (a store deleted or replaced): "
                        "refuse says what disagrees in one line and stops (default); repair marks MLflow runs that no "
                        "trial of this Optuna study owns (and a parent run of another Optuna study) "
                        "kdsweep.state=ORPHANED, status KILLED, which the report skips, and re-creates a run from "
                        "Optuna's record (params, val/test accuracy; no curves, no checkpoint) for each complete "
                        "trial whose run is gone; ignore goes on and says so")


def _perf_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speed (results are the same up to float rounding; docs/performance.md)")
    g.add_argument("--parallel", type=int, metavar="K",
                   help="ask K trials at once and train their students in lockstep on the same batches (default: 1)")
    g.add_argument("--teacher-cache-mb", type=float, metavar="MB",
                   help="memory for teacher outputs shared by all trials; logits are always kept, feature maps while they "
                        "fit (default: a quarter of the device's free memory; 0 disables)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile each architecture once per process (pays off on long GPU studies; default: off)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="NHWC memory format for conv models (default: on)")
    g.add_argument("--cpu-workers", type=int, metavar="N",
                   help="CPU only: worker threads (one intra-op thread each) that split the teacher's batch and share "
                        "out the students (default: the cores; 0: plain intra-op threads)")
    g.add_argument("--fused", action=argparse.BooleanOptionalAction,
                   help="stack the lockstep students that draw no random numbers into one model with one optimiser "
                        "step (torch.func.vmap) (default: on for CUDA with --parallel >= 2, off on CPU)")


def _settings(args, *skip: str) -> dict:
    """The study settings given as flags: one per StudyConfig field (the schema; imported only when a command runs)."""
    from kdsweep.api import settings

    return {k: getattr(args, k, None) for k in settings() if k not in skip}


def cmd_study(args) -> int:
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
    """One study per method, one after another, with the same split, stream, epochs and budget."""
    from kdsweep import api

    def starting(i: int, n: int, cfg) -> None:
        if not args.quiet:
            print(f"\n[{i}/{n}] {cfg.name}: budget {cfg.budget.describe()}", flush=True)

    flags = _settings(args, "study_name")
    result = api.sweep(args.methods, study_suffix=args.study_suffix, quiet=args.quiet, on_study=starting,
                       on_done=print_summary, **flags)
    if args.quiet:
        for why in result.skipped.items():
            print("skipping {}: {}".format(*why))
    print("\nsweep: " + ", ".join(
        f"{s['study'].split('-')[0]}={s['best']['val_acc']:.4f}" if s["best"] else f"{s['study']}=no complete trial"
        for s in (r.summary for r in result.studies.values())))
    print("next: kdsweep report")
    return 0


def cmd_methods(args) -> int:
    """The registry as a table: what each method is, what it reads, what it searches."""
    from kdsweep.methods.registry import METHODS
    from kdsweep.methods.space import LR_RANGES

    lr = "lr " + ", ".join(f"{v.describe()} ({opt})" for opt, v in LR_RANGES.items())
    rows = []
    for name in sorted(METHODS, key=lambda n: (n != "ce", n != "vanilla_kd", n)):
        m = METHODS[name]
        needs = "-" if not m.uses_teacher else ", ".join(t for t in ("logits", "feature", "embedding") if t in m.needs)
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
    from kdsweep.training.devices import resolve_device, set_cpu_threads
    from kdsweep.training.teacher import cache_lock, cache_path, train_teacher

    if args.arch is None and args.dataset and ":" in args.dataset:
        raise UserError(f"dataset {args.dataset} has no default teacher: pass --arch (e.g. --arch torchvision:resnet18)")
    cfg = StudyConfig(method="ce", name="teacher", **{k: v for k, v in vars(args).items()
                                                       if k in ("dataset", "data_dir", "data_size", "image_size", "val_fraction", "seed",
                                                                "device", "tracking_uri") and v is not None},
                      teacher=args.arch, student=args.arch, teacher_epochs=args.epochs)  # no student is trained
    device = resolve_device(cfg.device)
    if device.type == "cpu":  # as a study's teacher trains
        set_cpu_threads(default=get_dataset(cfg.dataset).cpu_threads)
    tracker = Tracker(cfg.tracking_uri)
    data = load_data(cfg.dataset, cfg.data_dir, cfg.data_size, cfg.seed, cfg.val_fraction, device, image_size=cfg.image_size)
    check_split(data, cfg.batch_size, cfg.val_fraction)
    path = Path(args.out) if args.out else cache_path(data.tag or cfg.dataset, cfg.teacher, cfg.seed, cfg.teacher_epochs, cfg.data_size, cfg.val_fraction)
    # The cache lock: a study starting meanwhile waits for this teacher instead of training its own.
    with cache_lock(path) if not args.out else contextlib.nullcontext():
        if path.exists() and not args.force:
            print(f"teacher already cached at {path} (--force to retrain)")
            return 0
        train_teacher(cfg.dataset, cfg.teacher, cfg.seed, cfg.teacher_epochs, data, tracker, path, batch_size=cfg.batch_size)
    from kdsweep.training import checkpoint

    meta = checkpoint.load(path)["meta"]
    print(f"teacher {cfg.teacher} on {cfg.dataset}: best epoch {meta['best_epoch'] + 1}, val_acc={meta['val_acc']:.4f}, "
          f"test_acc={meta['test_acc']:.4f} -> {path}")
    return 0


EPILOG_REPORT = """\
examples:
  kdsweep report --dataset digits                           # markdown tables on the terminal
  kdsweep report --dataset digits --format md,csv,json --out R
  kdsweep report --dataset digits --seeds 3 --out R --format md,tex,html
  kdsweep report --tracking-uri http://127.0.0.1:5000 --dataset cifar10 --seed 0

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
                        "something else are not compared (default: the settings most studies share; the others are named)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="default: auto")
    g.add_argument("--data-dir", help="where real datasets live (default: $KDSWEEP_DATA or ~/.cache/kdsweep/data)")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlruns/mlflow.db)")


def _studies(args) -> list[str] | None:
    return [s.strip() for s in args.studies.split(",") if s.strip()] if args.studies else None


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def cmd_report(args) -> int:
    from kdsweep.report.build import run_report

    run_report(args.tracking_uri, args.dataset, args.teacher, args.student, args.seed, _studies(args), args.format,
               args.out, args.seeds, args.device, args.data_dir, plots=not args.no_plots, log=not args.no_log, say=_stderr,
               per_trial=args.per_trial)
    return 0


def cmd_confirm(args) -> int:
    from kdsweep import api

    table = api.confirm(args.seeds, dataset=args.dataset, teacher=args.teacher, student=args.student, seed=args.seed,
                        studies=_studies(args), per_trial=args.per_trial, device=args.device, data_dir=args.data_dir,
                        tracking_uri=args.tracking_uri, say=_stderr)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdsweep",
        description="Tune knowledge-distillation methods fairly: one Optuna study per method, every trial tracked in MLflow.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="start here:\n  kdsweep study vanilla_kd --dataset digits --trials 10 --epochs 5\n"
               "  kdsweep study ce --dataset digits --trials 10 --epochs 5\n"
               "  kdsweep confirm --dataset digits --seeds 3\n  kdsweep report --dataset digits --out R --format md,csv\n"
               "  kdsweep ui\n  kdsweep status\n\n"
               "`kdsweep COMMAND --help` explains each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("study", help="run or resume an Optuna study of one method", description=cmd_study.__doc__ or
                       "Run (or resume) an Optuna study that tunes one distillation method.",
                       epilog=EPILOG_STUDY, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME", help="a method name, or a study file by its path (.toml)")
    _study_args(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("sweep", help="one study per method, same budget for each", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run (or resume) one study per method, one after another, with the same data split, "
                                   "augmentation stream, epochs and trial budget, so the methods compare fairly.",
                       epilog="examples:\n  kdsweep sweep --methods all --dataset digits --epochs 5       # 100 epochs per method\n"
                              "  kdsweep sweep --methods ce,vanilla_kd,dkd --budget-epochs 60 --epochs 5 --dataset digits\n"
                              "  kdsweep sweep --methods ce,vanilla_kd --trials 10 --epochs 3 --dataset digits --study-suffix try2\n\n"
                              "Every method gets the same budget: by default 20 trials' worth of epochs\n"
                              "(--budget-epochs 20 x --epochs), counted over all its trials, pruned ones\n"
                              "included, so a method that prunes more tries more configurations for the\n"
                              "same compute. Before anything trains, every method's study is checked: one\n"
                              "that exists with other settings stops the sweep (one line each, exit 2).\n"
                              "`all` runs every method whose needs the teacher/student pair can serve (ce\n"
                              "first) and says which it skips.")
    p.add_argument("--methods", default="all", help="`all` or a comma list of methods / study files (default: all)")
    _study_args(p, sweep=True)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("methods", help="list the distillation methods and their search spaces",
                       description="List every registered distillation method: what it does, what it needs from the models, "
                                   "what it searches (change a range in a study file: kdsweep study studies/NAME.toml), and where it comes from.")
    p.add_argument("--format", choices=["text", "tsv"], default="text")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("teacher", help="train and cache a teacher", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a teacher with cross-entropy, keep its best-validation epoch and cache it, keyed by "
                                   "(dataset, arch, seed, epochs, data size). Studies reuse the cached teacher.",
                       epilog="examples:\n  kdsweep teacher --dataset digits --arch digitnet_l --epochs 30\n"
                              "  kdsweep teacher --dataset cifar10 --arch resnet18 --epochs 100 --device cuda")
    _common_data(p)
    p.add_argument("--arch", help="teacher architecture (default: the dataset's teacher)")
    p.add_argument("--epochs", type=int, help="training epochs (default: per dataset)")
    p.add_argument("--out", help="write the checkpoint here instead of the cache")
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlruns/mlflow.db)")
    p.set_defaults(func=cmd_teacher)

    p = sub.add_parser("report", help="tables (and plots) ranking the methods of one teacher -> student pair",
                       description="Build the best-per-method, metrics and rank tables of a pair's studies from MLflow.",
                       epilog=EPILOG_REPORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    _report_select(p)
    g = p.add_argument_group("output")
    g.add_argument("--format", help="comma-separated: md,csv,tex,html,json (needs --out; default: markdown on the terminal)")
    g.add_argument("--out", help="directory for the table files and plots/")
    g.add_argument("--seeds", type=int, help="first confirm every method with K fresh seeds (as `kdsweep confirm --seeds K`), "
                                             "then report mean ± std over them")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--no-log", action="store_true", help="do not log the report as an MLflow run")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("confirm", help="retrain each method's best config with fresh seeds (resumable)",
                       description="Retrain the best trial of every study with K fresh seeds, logged as MLflow child runs.",
                       epilog=EPILOG_CONFIRM, formatter_class=argparse.RawDescriptionHelpFormatter)
    _report_select(p)
    p.add_argument("--seeds", type=int, default=3, help="confirmation seeds per method (default: 3)")
    p.set_defaults(func=cmd_confirm)

    p = sub.add_parser("bench", help="measure kdsweep's training path against a seed-style reference",
                       description="Benchmark a K-trial kdsweep study against K seed-style reference trials.",
                       epilog=EPILOG_BENCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help=f"one of {', '.join(DATASET_NAMES)} (default: synthetic, generated: no network)")
    p.add_argument("--data-dir", help="where real datasets live (default: $KDSWEEP_DATA or ~/.cache/kdsweep/data)")
    p.add_argument("--teacher", help="teacher architecture (default: resnet18, seed 003's)")
    p.add_argument("--student", help="student architecture (default: smallnet, seed 003's)")
    p.add_argument("--images", type=int, help="training images per epoch (default: 1024)")
    p.add_argument("--epochs", type=int, help="epochs per trial (default: 3)")
    p.add_argument("--trials", type=int, help="K, trials in the kdsweep study (default: 8)")
    p.add_argument("--batch-size", type=int, help="default: 128")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], help="default: auto (CUDA when there is one)")
    p.add_argument("--workers", type=int, help="DataLoader workers of the reference (default: 0 on CPU, the fastest there; cores - 1, at most 4, on CUDA)")
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default: the cores this process may use)")
    p.add_argument("--parallel", type=int, help="trials per lockstep group in the kdsweep study (default: all K)")
    p.add_argument("--ref-trials", type=int, help="reference trials to measure and average (default: 1)")
    p.add_argument("--teacher-cache-mb", type=float, help="teacher cache budget of the study (default: sized to the device)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("ui", help="open the MLflow UI on the study results",
                       description="Start `mlflow ui` on kdsweep's tracking store and print the link to the newest "
                                   "experiment's runs. Ctrl-C, `kill` or closing the terminal stops the server and every "
                                   "process it started; a port already in use is refused (exit 2).",
                       epilog="example:\n  kdsweep ui                 # then open the runs link it prints\n"
                              "  kdsweep ui --port 5001     # when 5000 is taken",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", help="default: sqlite:///mlruns/mlflow.db")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("status", help="the studies in a store: budget, trials by state, best, a worker running now",
                       description="List the studies of an Optuna storage: method, per-trial settings, budget, trials by "
                                   "state, epochs spent, best validation and test accuracy, whether a worker is running "
                                   "the study now, and its MLflow experiment and parent run. Reads only.",
                       epilog="examples:\n  kdsweep status\n  kdsweep status --json | jq '.studies[].best'\n"
                              "  kdsweep status --storage postgresql://user@host/db --tracking-uri http://127.0.0.1:5000",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_tracking(p)
    p.add_argument("--json", action="store_true", help="the same as JSON")
    p.set_defaults(func=cmd_status)
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
        print(f"\nkdsweep: {what}; run the same command again to resume.", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        sys.unraisablehook = previous.pop("unraisablehook", sys.unraisablehook)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def entry() -> None:
    """The `kdsweep` command: main(), and its status as the process's exit status."""
    code = main()
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
