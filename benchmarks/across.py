"""The blocks of docs/results/across.md (issue 23 item 4): sweep, confirm and rank every pair x teacher seed.

    python benchmarks/across.py --store /tmp/across --out docs/results/across \
        [--pairs mnist1d:cnn1d:mlp100,mnist1d:cnn1d:cnn1d_s,digits] [--teacher-seeds 0,1,2] [--control] \
        [--methods all] [--budget-epochs E] [--epochs N] [--seeds 5] [--device auto]
    python benchmarks/across.py --check docs/results/across     # the committed numbers agree with each other

For each pair (dataset[:teacher:student]; the dataset's own pair without them) it runs `kdsweep sweep
--teacher-seeds` at the same budget (with --control also a sweep with an untrained teacher, the first
teacher seed), then `kdsweep confirm --across --seeds K` and `kdsweep report --across`, all in the store
directory (its mlruns/). --out receives the report: blocks.csv (one row per block and method, the confirmed
mean test accuracy), across.md/.csv, report.html with the critical-difference diagram, plots/, and
timing.json (seconds per pair and stage). Last, the check: the Friedman statistic and p recomputed from
blocks.csv as read back must be the ones across.md prints.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PRINTED = re.compile(r"chi2 = ([\d.]+), p = ([\d.e+-]+)")


def check(out: Path) -> str:
    """The Friedman numbers recomputed from out/blocks.csv, compared with those out/across.md prints; raises if not."""
    import pandas as pd

    from kdsweep.report.across import friedman_from_frame

    stat, p = friedman_from_frame(pd.read_csv(out / "blocks.csv"))
    printed = PRINTED.search((out / "across.md").read_text())
    recomputed = f"chi2 = {stat:.3f}, p = {p:.3g}"
    if printed is None or printed.group(0) != recomputed:
        raise SystemExit(f"check failed: across.md prints {printed.group(0) if printed else 'no Friedman test'}, "
                         f"blocks.csv gives {recomputed}")
    return f"check: blocks.csv gives {recomputed}, as across.md prints"


def _pair(text: str) -> dict[str, str]:
    parts = text.split(":")
    if len(parts) not in (1, 3):
        raise SystemExit(f"--pairs takes dataset or dataset:teacher:student, got {text!r}")
    return {"dataset": parts[0]} if len(parts) == 1 else dict(zip(("dataset", "teacher", "student"), parts))


def _settings(args) -> dict:
    given = {k: getattr(args, k) for k in ("epochs", "budget_epochs", "trials", "teacher_epochs", "data_size")}
    return {"device": args.device, **{k: v for k, v in given.items() if v is not None}}


def _servable(methods: str, pair: dict[str, str], settings: dict) -> tuple[str, dict[str, str]]:
    """The methods of the list the pair can serve, and why each other one cannot: an explicit --methods list is
    refused by `kdsweep sweep` when a method does not fit the pair (only `all` skips), but across pairs a
    feature-map method belongs in the blocks whose student has maps, and is "missing" from the others."""
    if methods == "all":
        return methods, {}
    from kdsweep.study.config import resolve
    from kdsweep.study.pairs import pair_problem

    keep, skipped = [], {}
    for name in (n.strip() for n in methods.split(",") if n.strip()):
        why = pair_problem(resolve(name, {**pair, **settings}))
        if why:
            skipped[name] = why
        else:
            keep.append(name)
    return ",".join(keep), skipped


def run(args) -> dict:
    """Sweep every pair (each teacher seed, and the control), confirm every block, report; return the timings."""
    import kdsweep.api as kd

    seeds = [int(s) for s in args.teacher_seeds.split(",")]
    timing: dict = {"pairs": {}, "skipped": {}}
    start = time.monotonic()
    for text in args.pairs.split(","):
        t0 = time.monotonic()
        methods, skipped = _servable(args.methods, _pair(text), _settings(args))
        for name, why in skipped.items():
            print(f"{text}: skipping {name}: {why}", flush=True)
        timing["skipped"][text] = skipped
        kd.sweep_teacher_seeds(methods, seeds, quiet=True, **_pair(text), **_settings(args))
        if args.control:
            kd.sweep(methods, teacher_seed=seeds[0], teacher_control="untrained", quiet=True, **_pair(text),
                     **_settings(args))
        timing["pairs"][text] = round(time.monotonic() - t0, 1)
        print(f"{text}: swept in {timing['pairs'][text]:.0f} s", flush=True)
    t0 = time.monotonic()
    kd.confirm_across(args.seeds, device=args.device, say=lambda _: None)
    timing["confirm"] = round(time.monotonic() - t0, 1)
    report = Path("across-report")
    kd.report(across=True, out=str(report), formats="md,csv,html", plots=True, overwrite=True)
    timing["total"] = round(time.monotonic() - start, 1)
    timing["settings"] = {**_settings(args), "methods": args.methods, "teacher_seeds": seeds, "seeds": args.seeds,
                          "control": args.control, "pairs": args.pairs}
    return timing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", metavar="DIR", help="only compare DIR/blocks.csv with DIR/across.md")
    p.add_argument("--store", help="working directory of the run (its mlruns/ holds every study)")
    p.add_argument("--out", help="where the report goes (e.g. docs/results/across)")
    p.add_argument("--pairs", default="mnist1d:cnn1d:mlp100,mnist1d:cnn1d:cnn1d_s,digits")
    p.add_argument("--teacher-seeds", default="0,1,2")
    p.add_argument("--control", action="store_true", help="also an untrained-teacher block per pair")
    p.add_argument("--methods", default="all")
    p.add_argument("--seeds", type=int, default=5, help="confirmation seeds per method and block")
    p.add_argument("--device", default="auto")
    for flag in ("--epochs", "--budget-epochs", "--trials", "--teacher-epochs", "--data-size"):
        p.add_argument(flag, type=int)
    args = p.parse_args()
    if args.check:
        print(check(Path(args.check)))
        return
    if not (args.store and args.out):
        p.error("--store and --out are needed (or --check DIR)")
    out = Path(args.out).resolve()
    Path(args.store).mkdir(parents=True, exist_ok=True)
    os.chdir(args.store)  # kdsweep's default stores are relative to the current directory
    timing = run(args)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path("across-report").rglob("*"):
        if f.is_file() and not f.name.startswith("."):
            dst = out / f.relative_to("across-report")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
    (out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    print(f"wrote {out} in {timing['total']:.0f} s")
    print(check(out))


if __name__ == "__main__":
    main()
