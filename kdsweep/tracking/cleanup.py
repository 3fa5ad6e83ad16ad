"""Nothing left behind: MLflow runs of dead processes, temporary directories, half-written report directories.

* Runs. `confirm` and `report` runs carry their owner (node, host, pid, start
  time: workers.Owner) in the tag `kdsweep.owner`. The next `confirm` or
  `report` on the same experiment closes RUNNING runs whose owner ran on this
  node and is gone, as KILLED with `kdsweep.reason`. (Trial runs are
  reconciled against Optuna instead, in study/loop.py.)
* Temporary directories carry the pid of their process in their name; they
  are removed on every exit Python sees, and the next run removes those of
  processes that were killed outright.
* `report --out DIR` is written to a sibling temp directory and renamed into
  place at the end, so a killed report never leaves a DIR that looks complete.
"""

from __future__ import annotations

import json
from typing import Callable, Iterable

from kdsweep.common.processes import Owner
from kdsweep.tracking.vocabulary import OWNER_TAG, REASON_TAG, RUN_KILLED, RUN_RUNNING, STATE_FAIL, STATE_TAG

# ---------------------------------------------------------------- runs


def owner_tags() -> dict[str, str]:
    """Tags that let a later process tell whether this one is still running the run."""
    return {OWNER_TAG: json.dumps(Owner.me().as_attr(), sort_keys=True)}


def run_owner(run) -> Owner | None:
    try:
        return Owner.from_attr(json.loads(run.data.tags.get(OWNER_TAG, "")))
    except ValueError:
        return None


def close_dead_runs(tracker, experiment_id: str, roles: Iterable[str], say: Callable[[str], None] = print,
                    close: Callable[[str, str], None] | None = None) -> int:
    """Close the RUNNING runs of `roles` whose owner process is gone; return how many.

    `close(run_id, reason)` ends one (default: KILLED, tagged FAIL with the reason); confirmation runs
    pass study.outcome's writer. Runs without an owner (older kdsweep) or owned on another machine are
    left alone: nothing here can tell whether they still run.
    """
    closed = 0
    for role in roles:
        for run in tracker.find_runs(experiment_id, {"kdsweep.role": role}, statuses=(RUN_RUNNING,)):
            owner = run_owner(run)
            if owner is None or owner.alive() is not False:
                continue
            reason = f"its process {owner} is gone (killed or crashed)"
            if close is not None:
                close(run.info.run_id, reason)
            else:
                tracker.close(run.info.run_id, RUN_KILLED, {STATE_TAG: STATE_FAIL, REASON_TAG: reason})
            say(f"closed {role} run {run.info.run_id}, left RUNNING: {reason}")
            closed += 1
    return closed


# ---------------------------------------------------------------- temporary directories


# ---------------------------------------------------------------- report directories


