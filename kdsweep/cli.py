"""The `kdsweep` command line: argparse subcommands, one-line errors, exit status 2 for bad input."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Callable

from .errors import UserError

EPILOG_STUDY = """\
examples:
  kdsweep study vanilla_kd --trials 50                      # CIFAR-10, ResNet-18 -> SmallNet
  kdsweep study vanilla_kd --dataset digits --trials 10 --epochs 5
  kdsweep study ce --dataset digits --trials 10 --epochs 5  # the baseline to beat
  kdsweep study studies/my_kd.toml --device cuda            # a study file

NAME is a method (`kdsweep methods` lists them) or a study file: studies/NAME.toml
or a path to a .toml. Precedence: built-in defaults < study file < flags.
Running the same command again resumes the study: it adds trials until the study
holds --trials complete trials (pruned and failed trials do not count).

Each trial trains the student with SGD (momentum, weight decay, per-step cosine
lr) on the training split, reports validation accuracy to Optuna after every
epoch (so the pruner can stop bad trials) and logs everything to MLflow: one
parent run per study, one child run per trial. The test split is evaluated once
per complete trial, at its best-validation epoch, and never used for tuning.
"""


def _common_data(p: argparse.ArgumentParser) -> None:
    from .data import DATASETS

    g = p.add_argument_group("data and models")
    g.add_argument("--dataset", help=f"one of {', '.join(DATASETS)} (default: cifar10)")
    g.add_argument("--data-dir", help="where real datasets live / are downloaded (default: $KDSWEEP_DATA or ~/.cache/kdsweep/data)")
    g.add_argument("--data-size", type=int, help="training images to use (synthetic: to generate; default: all, synthetic 5000)")
    g.add_argument("--val-fraction", type=float, help="share of the training set held out for validation (default: 0.1)")
    g.add_argument("--seed", type=int, help="seed of the split, augmentation stream, initialisation and sampler (default: 0)")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], help="default: auto (CUDA when there is one)")


def _common_tracking(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("storage and tracking")
    g.add_argument("--storage", help="Optuna storage URL (default: sqlite:///mlruns/optuna.db; e.g. postgresql://user@host/db)")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlruns/mlflow.db; e.g. http://127.0.0.1:5000)")


def _study_args(p: argparse.ArgumentParser) -> None:
    _common_data(p)
    g = p.add_argument_group("models")
    g.add_argument("--teacher", help="teacher architecture (default: the dataset's pair)")
    g.add_argument("--student", help="student architecture (default: the dataset's pair)")
    g.add_argument("--teacher-epochs", type=int, help="epochs of a teacher trained when none is cached (default: per dataset)")
    g.add_argument("--teacher-checkpoint", help="use this teacher checkpoint instead of the cache (loaded with weights_only=True)")
    g = p.add_argument_group("budget (the same for every method)")
    g.add_argument("--trials", type=int, help="complete trials the study should hold (default: 20)")
    g.add_argument("--epochs", type=int, help="epochs per trial (default: per dataset, e.g. digits 10)")
    g.add_argument("--batch-size", type=int, help="default: per dataset (digits 32, others 128)")
    g.add_argument("--momentum", type=float, help="SGD momentum (default: 0.9)")
    g.add_argument("--weight-decay", type=float, help="default: 5e-4")
    g.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    g = p.add_argument_group("search")
    g.add_argument("--sampler", choices=["tpe", "random"], help="default: tpe")
    g.add_argument("--pruner", choices=["median", "hyperband", "none"], help="default: median")
    g.add_argument("--study-name", help="Optuna study name (default: NAME-dataset-teacher-student-sSEED)")
    _common_tracking(p)


STUDY_KEYS = ("dataset", "data_dir", "data_size", "val_fraction", "seed", "device", "teacher", "student", "teacher_epochs",
              "teacher_checkpoint", "trials", "epochs", "batch_size", "momentum", "weight_decay", "timeout", "sampler",
              "pruner", "study_name", "storage", "tracking_uri")


def cmd_study(args) -> int:
    from .config import resolve
    from .study import run_study

    cfg = resolve(args.name, {k: getattr(args, k) for k in STUDY_KEYS})
    summary = run_study(cfg)
    print_summary(summary)
    return 0


def print_summary(s: dict) -> None:
    print(f"\nstudy {s['study']}: {s['complete']} complete, {s['pruned']} pruned, {s['failed']} failed")
    best = s["best"]
    if best:
        params = ", ".join(f"{k}={v:.4g}" for k, v in best["params"].items())
        print(f"  best trial #{best['number']}: val_acc={best['val_acc']:.4f} test_acc={best['test_acc']:.4f}  ({params})")
    print(f"  MLflow: experiment {s['experiment']!r}, parent run {s['parent_run']} at {s['tracking_uri']}")
    print("  browse: kdsweep ui")


def cmd_teacher(args) -> int:
    from pathlib import Path

    from .config import StudyConfig
    from .data import load_data
    from .study import resolve_device
    from .teacher import cache_path, train_teacher
    from .tracking import Tracker

    cfg = StudyConfig(method="ce", name="teacher", **{k: v for k, v in vars(args).items()
                                                       if k in ("dataset", "data_dir", "data_size", "val_fraction", "seed",
                                                                "device", "tracking_uri") and v is not None},
                      teacher=args.arch, teacher_epochs=args.epochs)
    device = resolve_device(cfg.device)
    tracker = Tracker(cfg.tracking_uri)
    data = load_data(cfg.dataset, cfg.data_dir, cfg.data_size, cfg.seed, cfg.val_fraction, device)
    path = Path(args.out) if args.out else cache_path(cfg.dataset, cfg.teacher, cfg.seed, cfg.teacher_epochs, cfg.data_size, cfg.val_fraction)
    if path.exists() and not args.force:
        print(f"teacher already cached at {path} (--force to retrain)")
        return 0
    train_teacher(cfg.dataset, cfg.teacher, cfg.seed, cfg.teacher_epochs, data, tracker, path, batch_size=cfg.batch_size)
    from . import checkpoint

    meta = checkpoint.load(path)["meta"]
    print(f"teacher {cfg.teacher} on {cfg.dataset}: best epoch {meta['best_epoch']}, val_acc={meta['val_acc']:.4f}, "
          f"test_acc={meta['test_acc']:.4f} -> {path}")
    return 0


def cmd_ui(args) -> int:
    import subprocess

    from .tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    if uri.startswith("http"):
        raise UserError(f"{uri} is already a tracking server: open it in a browser")
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
        raise UserError(f"no MLflow store at {uri} yet: run a study first")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
           "--workers", "1"]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {args.host} exposes the MLflow UI, which has no login, to other machines", file=sys.stderr)
    print(f"MLflow UI on http://{args.host}:{args.port} (Ctrl-C to stop)")
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdsweep",
        description="Tune knowledge-distillation methods fairly: one Optuna study per method, every trial tracked in MLflow.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="start here:\n  kdsweep study vanilla_kd --dataset digits --trials 10 --epochs 5\n  kdsweep ui\n\n"
               "`kdsweep COMMAND --help` explains each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("study", help="run or resume an Optuna study of one method", description=cmd_study.__doc__ or
                       "Run (or resume) an Optuna study that tunes one distillation method.",
                       epilog=EPILOG_STUDY, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME", help="a method name or a study file")
    _study_args(p)
    p.set_defaults(func=cmd_study)

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

    p = sub.add_parser("ui", help="open the MLflow UI on the study results", description="Start `mlflow ui` on kdsweep's tracking store.",
                       epilog="example:\n  kdsweep ui                 # then open http://127.0.0.1:5000",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", help="default: sqlite:///mlruns/mlflow.db")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a preempted machine, `kill`): cleaned up like Ctrl-C."""


def _on_signal(signum, frame):
    from .workers import request_stop

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
    from .workers import request_stop

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
    try:
        return func(args) or 0
    except UserError as e:
        print(f"kdsweep: error: {e}", file=sys.stderr)
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
