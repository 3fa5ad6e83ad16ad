"""What one small SQLite commit costs on this machine, in each journal mode kdsweep could use.

    python benchmarks/sqlite_commit.py [--commits 300] [--dir DIR]

A trial writes dozens of small transactions to each store; kdsweep's stores run in WAL mode with
synchronous=NORMAL (kdsweep/common/sqlite_stores.py). This times 300 one-row commits in a fresh file per
mode, in the directory given (the file system decides the cost of a sync: use the stores' own).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time

MODES = [("DELETE", "FULL"), ("WAL", "FULL"), ("WAL", "NORMAL")]  # SQLite's default, WAL synced per commit, kdsweep's


def per_commit(path: str, journal: str, sync: str, commits: int) -> float:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute(f"PRAGMA journal_mode={journal}")
    con.execute(f"PRAGMA synchronous={sync}")
    con.execute("CREATE TABLE t (a, b)")
    start = time.perf_counter()
    for i in range(commits):
        con.execute("BEGIN")
        con.execute("INSERT INTO t VALUES (?, ?)", (i, i))
        con.execute("COMMIT")
    seconds = time.perf_counter() - start
    con.close()
    return seconds / commits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commits", type=int, default=300)
    ap.add_argument("--dir", default=None, help="where the test files go (default: a temporary directory)")
    args = ap.parse_args()
    print(f"load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for journal, sync in MODES:
            ms = per_commit(os.path.join(tmp, f"{journal}-{sync}.db"), journal, sync, args.commits) * 1e3
            print(f"journal_mode={journal:<6} synchronous={sync:<6} {ms:8.3f} ms a commit")


if __name__ == "__main__":
    main()
