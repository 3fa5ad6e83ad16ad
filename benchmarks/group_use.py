"""How full a sweep's lockstep groups stayed, read from its Optuna store (a `verdict.py --keep DIR` store).

    python benchmarks/group_use.py DIR/optuna.db

A group's trials are claimed together and train in lockstep (study/trial.py, execute_group): a member pruned
after two epochs leaves the group's step at once, and no trial takes its place (since the evening of 2026-12-06
its trial also ends then; before, it stayed RUNNING, holding its whole per-trial budget, until the group
ended). This prints, per group (one worker process's trials claimed within a
second of each other, before the first of them ended), its size, the longest member's epochs, the member-epochs it trained and their share of
size x longest ("use"), and its seconds; then the sweep's totals. A small use means the group ran most of its
epochs with few members, where a member-epoch costs more (docs/performance.md, "What the targets of issue 20
still need").
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import sqlite3

from kdsweep.tracking.vocabulary import EPOCHS_ATTR, OWNER_ATTR


def _seconds(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp).timestamp()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("optuna_db", help="the sweep's optuna.db")
    args = ap.parse_args()
    db = sqlite3.connect(f"file:{args.optuna_db}?mode=ro", uri=True)
    attrs: dict[int, dict] = collections.defaultdict(dict)
    for trial_id, key, value in db.execute("select trial_id, key, value_json from trial_user_attributes"):
        attrs[trial_id][key] = json.loads(value)
    trials = [(i, _seconds(a), _seconds(b)) for i, a, b in
              db.execute("select trial_id, datetime_start, datetime_complete from trials where datetime_complete is not null")]
    t0 = min(a for _, a, _ in trials)
    groups: dict[tuple, list] = collections.defaultdict(list)
    for i, start, end in sorted(trials, key=lambda t: t[1]):
        owner = attrs[i].get(OWNER_ATTR, {}).get("pid")
        # one group: one worker's trials claimed together (within a second), before the first of them ended (a
        # worker starts its next group after its last one ends)
        key = next((k for k in groups if k[0] == owner and start - k[1] < 1.0 and start < k[2]), (owner, start, end))
        groups[key].append((attrs[i].get(EPOCHS_ATTR) or 0, end - start))
    print("start s  worker  size  longest  member-epochs  use   seconds")
    trained = slots = 0
    for (owner, start, _), members in sorted(groups.items(), key=lambda kv: kv[0][1]):
        epochs = [e for e, _ in members]
        longest = max(epochs)
        trained, slots = trained + sum(epochs), slots + len(members) * longest
        use = f"{sum(epochs) / (len(members) * longest):.2f}" if longest else "  - "
        print(f"{start - t0:7.1f}  {owner!s:>6}  {len(members):4d}  {longest:7d}  {sum(epochs):13d}  {use}  "
              f"{max(s for _, s in members):7.1f}")
    print(f"{len(groups)} groups: {trained} member-epochs trained in {slots} member-epoch slots (size x longest): "
          f"use {trained / slots:.3f}")
    live = collections.Counter()  # group-epochs by how many members were still training in them
    for members in groups.values():
        epochs = [e for e, _ in members]
        for epoch in range(max(epochs)):
            live[sum(e > epoch for e in epochs)] += 1
    bands = [(1, 2), (3, 4), (5, 8), (9, 16), (17, 64)]
    print("group-epochs by members still training: " + ", ".join(
        f"{a}-{b}: {sum(n for k, n in live.items() if a <= k <= b)}" for a, b in bands if any(a <= k <= b for k in live)))


if __name__ == "__main__":
    main()
