"""How long `kdsweep --help` takes, and what it imports (issue 13: target under 0.3 s).

    python benchmarks/help_time.py [--runs 5] [ARGS ...]     # default ARGS: --help; e.g. study --bogus

Each run is a fresh `python -m kdsweep.cli ARGS` process with this checkout first on PYTHONPATH, so
the time includes the interpreter's start; the median of the runs is printed with the min and max.
The last line lists the modules the same command imported beyond the interpreter's own start-up
(third-party first), measured in one more process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "mlflow", "optuna", "pandas", "numpy", "sklearn", "matplotlib", "sqlalchemy")

# Runs the CLI in-process and reports which modules it added to sys.modules (stdout of the CLI is discarded).
PROBE = """
import contextlib, io, json, sys
before = set(sys.modules)
from kdsweep import cli
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        cli.main(sys.argv[1:])
    except SystemExit:
        pass
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ns, rest = ap.parse_known_args()  # everything else is the CLI's: `study --help`, `study --bogus`
    ns.args = rest or ["--help"]
    times = []
    for _ in range(ns.runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "kdsweep.cli", *ns.args], env=env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t0)
    probe = subprocess.run([sys.executable, "-c", PROBE, *ns.args], env=env(), capture_output=True, text=True, check=True)
    mods = json.loads(probe.stdout.strip().splitlines()[-1])
    tops = sorted({m.split(".")[0] for m in mods})
    heavy = [m for m in HEAVY if m in tops]
    third = [m for m in tops if m != "kdsweep" and m not in sys.stdlib_module_names and not m.startswith("_")]
    print(f"kdsweep {' '.join(ns.args)}: median {statistics.median(times):.3f} s over {ns.runs} runs "
          f"(min {min(times):.3f}, max {max(times):.3f}); target < 0.3 s")
    print(f"imported {len(mods)} modules; kdsweep: {', '.join(m for m in mods if m.startswith('kdsweep'))}; "
          f"third-party: {', '.join(third) or 'none'}; heavy ({'/'.join(HEAVY)}): {', '.join(heavy) or 'none'}")


if __name__ == "__main__":
    main()
