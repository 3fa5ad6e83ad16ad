"""How long a verdict takes, against the batched floor of the same epochs measured in the same run.

    python benchmarks/verdict.py                       # ce, vanilla_kd, pkt, cosine on MNIST-1D, 240 epochs each
    python benchmarks/verdict.py --parallel 8          # their trials in lockstep groups of 8
    python benchmarks/verdict.py --parallel 16 --processes 2   # two worker processes, 16 trials each at once
                                                       # (and confirmation as two worker processes)
    python benchmarks/verdict.py --methods all --budget-epochs 300 --confirm-seeds 5   # the whole MNIST-1D verdict
    python benchmarks/verdict.py --methods all --budget-epochs 300 --confirm-seeds 5 --parallel 32 --no-resume \\
        --keep DIR                                     # ... exactly the budget, stores kept for `kdsweep report`

Runs, each in its own process, in this order: the floor, the sweep on new stores (start-up, migrations
included), the same sweep resumed with one more trial's worth of epochs per method on the now existing
stores (its time to the first trial is the start-up a user pays again), confirmation if asked, the floor
again. The teacher is trained first if it is not cached, outside the timings (`kdsweep teacher`).

The floor is plain PyTorch, no kdsweep import: 32 MNIST-1D MLPs (40-100-100-10) with stacked weights,
trained at once with batched matmuls over the same number of samples per epoch, batch size, Adam and
cosine schedule, with a validation pass per epoch, once on one thread and once on every core (kdsweep uses
every core: its lockstep groups step on a worker thread per core); the faster one's seconds per
trial-epoch times the epochs the sweep trained is what the sweep would cost with nothing but that
arithmetic. The sweep's own process
reports where its time went: start-up to the first trial (and how much of it is importing torch, optuna, mlflow
and kdsweep), training (lockstep epochs with their
validation pass), and bookkeeping (MLflow and Optuna writes: opening a trial's run, its epochs, its end).
With --processes the workers train in processes of their own, so only what the stores say is shown: when the
first trial started. Every step shows how long its process ran after its last trial (or confirmation run) ended.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time

T0 = time.perf_counter()
STARTED = time.time()  # T0 on the clock the stores' timestamps use
HERE = os.path.dirname(os.path.abspath(__file__))


def floor(epochs: int, threads: int = 1, k: int = 32, n_train: int = 3600, n_val: int = 400, batch: int = 100) -> dict:
    """Seconds per trial-epoch of K stacked MLPs trained at once (the arithmetic, batched; no kdsweep)."""
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n_train, 40, generator=g), torch.randint(0, 10, (n_train,), generator=g)
    vx, vy = torch.randn(n_val, 40, generator=g), torch.randint(0, 10, (n_val,), generator=g)
    sizes = [(40, 100), (100, 100), (100, 10)]
    ws = [(torch.randn(k, i, o, generator=g) / i**0.5).requires_grad_() for i, o in sizes]
    bs = [torch.zeros(k, 1, o).requires_grad_() for _, o in sizes]
    lr = torch.logspace(-3, -1.5, k).view(k, 1, 1)
    opt = torch.optim.Adam(ws + bs, lr=1.0)  # the per-member lr multiplies the gradients' step below
    steps = epochs * (n_train // batch)

    def forward(inp):
        h = inp.expand(k, *inp.shape)
        for i, (w, b) in enumerate(zip(ws, bs)):
            h = torch.baddbmm(b, h, w)
            h = torch.relu(h) if i < len(ws) - 1 else h
        return h

    start, step, best = time.perf_counter(), 0, torch.zeros(k)
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=g)
        for j in range(0, n_train - batch + 1, batch):
            idx = perm[j : j + batch]
            out = forward(x[idx])
            loss = torch.nn.functional.cross_entropy(out.reshape(-1, 10), y[idx].repeat(k), reduction="sum") / batch
            opt.zero_grad(set_to_none=True)
            loss.backward()
            scale = 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / steps)))
            for p in ws + bs:
                p.grad.mul_(lr * scale)
            opt.step()
            step += 1
        with torch.no_grad():
            best = torch.maximum(best, (forward(vx).argmax(-1) == vy).float().mean(1))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "per_trial_epoch": seconds / (k * epochs), "k": k, "epochs": epochs, "threads": threads}


def instrumented(argv: list[str]) -> dict:
    """Run the kdsweep command `argv` in this process and say where its time went."""
    from kdsweep.common import collector

    collector.pause()  # as the `kdsweep` command does (cli.entry), before its imports
    if "--processes" in argv:  # the command only starts its workers: it imports nothing heavy, as a user's does
        return {**_run(argv), "imports": math.nan}
    # What the command imports on its way to the first trial, first and timed apart: the rest of the start-up is
    # kdsweep's own (opening the stores and studies, data, teacher).
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import mlflow.tracking  # noqa: F401
    import optuna  # noqa: F401
    import torch  # noqa: F401

    import kdsweep.cli  # noqa: F401
    imports = time.perf_counter() - T0
    from kdsweep.study import outcome, trial
    from kdsweep.training import loop as training

    took = {"imports": imports, "first_trial": None, "training": 0.0, "bookkeeping": 0.0, "trial_epochs": 0}

    def timed(fn, key):
        def call(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                took[key] += time.perf_counter() - t
        return call

    def first(fn):
        def call(*a, **k):
            if took["first_trial"] is None:
                took["first_trial"] = time.perf_counter() - T0
            return fn(*a, **k)
        return call

    train_epoch = training.Lockstep._train_epoch

    def counted(self):
        took["trial_epochs"] += sum(r.alive for r in self.runs)
        return train_epoch(self)

    training.Lockstep._train_epoch = timed(counted, "training")
    for name in ("_open", "_fill"):
        setattr(trial, name, timed(getattr(trial, name), "bookkeeping"))
    outcome.end_trial = trial.oc.end_trial = timed(outcome.end_trial, "bookkeeping")
    callback = trial._epoch_callback
    trial._epoch_callback = lambda ctx, tr: timed(callback(ctx, tr), "bookkeeping")
    trial._claim_next = None  # (not used: claims are timed as part of the loop's own overhead)
    from kdsweep.study import loop

    loop.execute, loop.execute_group = first(loop.execute), first(loop.execute_group)
    took.update(_run(argv))
    return took


def _run(argv: list[str]) -> dict:
    """Run `kdsweep ARGV` here: its wall time since this process started, and from the stores (read after the
    timing) how long after its last trial's end it ended; with --processes, whose workers trained in processes
    of their own, also when its first trial started and the epochs the store holds afterwards."""
    from kdsweep.cli import main

    sys.argv = ["kdsweep", *argv]
    try:
        main()
    except SystemExit as e:
        if e.code:
            raise
    out = {"wall": time.perf_counter() - T0}
    ended, reading = time.time(), time.perf_counter()
    confirm = argv[0] == "confirm"
    first, last = (_confirm_times if confirm else _trial_times)(argv[argv.index("--tracking-uri" if confirm else "--storage") + 1])
    out["after_last_trial"] = ended - last
    if "--processes" in argv:
        out.update(training=math.nan, bookkeeping=math.nan, first_trial=first - STARTED)
        if confirm:  # a new store: every confirmation run in it is this step's
            out["trial_epochs"] = _confirm_epochs_in(argv[argv.index("--tracking-uri") + 1])
        else:
            out["stored_epochs"] = _epochs_in(argv[argv.index("--storage") + 1])
    out["reading"] = time.perf_counter() - reading  # not the command's: child() takes it off the process's time
    return out


def _trial_times(storage: str) -> tuple[float, float]:
    """When the first trial this step started began and when its last trial ended (seconds since the epoch)."""
    import optuna

    trials = [t for n in optuna.get_all_study_names(storage)
              for t in optuna.load_study(study_name=n, storage=storage).get_trials(deepcopy=False)
              if t.datetime_start is not None and t.datetime_start.timestamp() >= STARTED]
    return (min((t.datetime_start.timestamp() for t in trials), default=math.nan),
            max((t.datetime_complete.timestamp() for t in trials if t.datetime_complete is not None), default=math.nan))


def _confirm_times(tracking_uri: str) -> tuple[float, float]:
    """When this step's first confirmation run started and its last ended (seconds since the epoch)."""
    runs = [r for r in _confirm_runs(tracking_uri) if r.info.start_time / 1e3 >= STARTED]
    return (min((r.info.start_time / 1e3 for r in runs), default=math.nan),
            max((r.info.end_time / 1e3 for r in runs if r.info.end_time), default=math.nan))


def _confirm_runs(tracking_uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    return [r for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id], "tags.`kdsweep.role` = 'confirm'", max_results=10000)]


def _epochs_in(storage: str) -> int:
    """Epochs trained by every study in the Optuna store."""
    import optuna

    from kdsweep.study.budget import Spent

    return sum(Spent.of(optuna.load_study(study_name=n, storage=storage).get_trials(deepcopy=False)).epochs
               for n in optuna.get_all_study_names(storage))


def _confirm_epochs_in(tracking_uri: str) -> int:
    """Epochs trained by the confirmation runs in the MLflow store."""
    return int(sum(r.data.metrics.get("epochs_trained", 0) for r in _confirm_runs(tracking_uri)))


def child(argv: list[str], env: dict) -> dict:
    """One measured step in a fresh process (its wall time includes Python's and the imports' start-up, and its
    exit; not the benchmark's own reading of the stores afterwards)."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(argv)], env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(argv[:2])} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_wall"] = time.perf_counter() - t - result.get("reading", 0.0)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="ce,vanilla_kd,pkt,cosine")
    ap.add_argument("--budget-epochs", type=int, default=240)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--confirm-seeds", type=int, default=0)
    ap.add_argument("--processes", type=int, default=1, help="worker processes of the sweep and of confirmation")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--floor-epochs", type=int, default=30)
    ap.add_argument("--no-resume", action="store_true", help="skip the resumed step (a verdict of exactly the budget)")
    ap.add_argument("--keep", metavar="DIR", help="keep the stores in DIR (a new folder), for `kdsweep report` afterwards")
    args, extra = ap.parse_known_args()
    if args.child is not None:
        argv = json.loads(args.child)
        print(json.dumps(floor(int(argv[1]), int(argv[2])) if argv[0] == "floor" else instrumented(argv)), flush=True)
        if argv[0] != "floor":  # the step's process ends as the `kdsweep` command's does (cli.entry)
            from kdsweep.cli import release

            release()
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as scratch:  # its MLflow store is not the benchmark's, nor the caller's
        subprocess.run([sys.executable, "-m", "kdsweep.cli", "teacher", "--dataset", "mnist1d"], env=env, check=True,
                       capture_output=True, cwd=scratch)  # cached after the first time: not timed
    if args.keep:
        os.makedirs(args.keep)  # a new folder: a verdict is timed on new stores
    with (contextlib.nullcontext(os.path.abspath(args.keep)) if args.keep else tempfile.TemporaryDirectory()) as tmp:
        stores = ["--storage", f"sqlite:///{tmp}/optuna.db", "--tracking-uri", f"sqlite:///{tmp}/mlflow.db"]
        processes = ["--processes", str(args.processes)] if args.processes > 1 else []
        sweep = ["sweep", "--methods", args.methods, "--dataset", "mnist1d", "--epochs", str(args.epochs),
                 "--parallel", str(args.parallel), "--quiet", *stores, *processes, *extra]
        print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
        # The floor on one thread and on every core: kdsweep may use every core, so the ratio is to the faster.
        cores = str(len(os.sched_getaffinity(0)))
        rows = [("floor", child(["floor", str(args.floor_epochs), n], env)) for n in dict.fromkeys(["1", cores])]
        rows.append(("sweep, new stores", child([*sweep, "--budget-epochs", str(args.budget_epochs)], env)))
        if not args.no_resume:
            rows.append(("resumed, +1 trial", child([*sweep, "--budget-epochs", str(args.budget_epochs + args.epochs)], env)))
        if args.confirm_seeds:
            rows.append(("confirm", child(["confirm", "--seeds", str(args.confirm_seeds), "--dataset", "mnist1d",
                                           "--tracking-uri", stores[3], *processes], env)))
        rows += [("floor", child(["floor", str(args.floor_epochs), n], env)) for n in dict.fromkeys(["1", cores])]
    stored = 0
    for _, r in rows:  # --processes: each sweep step trained what the store gained
        if "stored_epochs" in r:
            r["trial_epochs"], stored = r["stored_epochs"] - stored, r["stored_epochs"]
    report(rows, args)
    if args.keep:
        print(f"\nstores kept: kdsweep report --dataset mnist1d --tracking-uri sqlite:///{os.path.abspath(args.keep)}/mlflow.db "
              "--format md,csv,json,html --out REPORT_DIR --no-log")


def report(rows: list[tuple[str, dict]], args) -> None:
    by_threads: dict[int, list[float]] = {}
    for name, r in rows:
        if name == "floor":
            by_threads.setdefault(r["threads"], []).append(r["per_trial_epoch"])
    means = {n: sum(v) / len(v) for n, v in by_threads.items()}
    best = min(means, key=means.get)
    per = means[best]
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for n, v in sorted(by_threads.items()):
        print(f"floor on {n} thread{'s' if n > 1 else ''}: {means[n] * 1e3:.2f} ms per trial-epoch (32 stacked MLPs; runs: "
              f"{', '.join(f'{f * 1e3:.2f}' for f in v)}){'  <- the floor' if n == best else ''}")
    print()
    print(f"{'step':<20} {'wall s':>8} {'to 1st trial s':>15} {'of it imports':>14} {'trial-epochs':>13} {'training s':>11} "
          f"{'bookkeeping ms/trial-epoch':>27} {'after last trial s':>19} {'floor s':>8} {'ratio':>6}")
    total_wall = total_floor = 0.0
    for name, r in rows:
        if name == "floor":
            continue
        n = r.get("trial_epochs", 0)
        fl = per * n
        total_wall, total_floor = total_wall + r["process_wall"], total_floor + fl
        book = r["bookkeeping"] / n * 1e3 if n else float("nan")
        print(f"{name:<20} {r['process_wall']:8.1f} {r['first_trial'] or float('nan'):15.2f} {r['imports']:14.2f} {n:13d} "
              f"{r['training']:11.1f} {book:27.2f} {r['after_last_trial'] + r['process_wall'] - r['wall']:19.2f} {fl:8.1f} "
              f"{r['process_wall'] / fl if fl else float('nan'):6.1f}")
    sweep = next(r for name, r in rows if name != "floor")
    print(f"\nsweep ({args.methods}, {args.budget_epochs} epochs each, --parallel {args.parallel}): "
          f"{sweep['process_wall']:.1f} s = {sweep['process_wall'] / (per * sweep['trial_epochs']):.1f} x the floor "
          f"of its {sweep['trial_epochs']} trial-epochs; all steps: {total_wall:.1f} s = {total_wall / total_floor:.1f} x")


if __name__ == "__main__":
    main()
