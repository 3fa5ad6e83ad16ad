"""A study's budget: what counts as spent, and when a worker may claim another trial.

Every trial that trained counts - complete, pruned, or diverged - because
each one cost compute; a budget in complete trials alone lets a method that
prunes a lot train without bound (seen: 30 complete trials and 1,535 pruned).
Trials lost to infrastructure (a killed worker, a stale heartbeat, Ctrl-C)
never record what they trained: they are retried and do not count.

Two stopping rules, either or both:
  * --trials N: N trials that trained;
  * --budget-epochs E: epochs trained, summed over all trials. Pruning then
    buys more configurations inside the same compute, which is the unit in
    which methods compare fairly.
A running trial reserves a whole trial's epochs, so workers never claim past
the budget; a study ends with between E and E + epochs - 1 epochs spent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

from kdsweep.tracking.vocabulary import EPOCHS_ATTR


def trained(t: FrozenTrial) -> bool:
    # COMPLETE and PRUNED trials of studies from before the attribute existed count too. A trial whose worker
    # died after writing the attribute but before ending the trial is failed as stale, which clears it
    # (workers.fail_trial): it is retried, and must not count twice.
    return t.user_attrs.get(EPOCHS_ATTR) is not None or t.state in (TrialState.COMPLETE, TrialState.PRUNED)


def epochs_of(t: FrozenTrial) -> int:
    """Epochs a finished trial trained (older studies: the epochs it reported)."""
    if t.user_attrs.get(EPOCHS_ATTR) is not None:
        return int(t.user_attrs[EPOCHS_ATTR])
    return len(t.intermediate_values) if trained(t) else 0


@dataclass(frozen=True)
class Spent:
    trials: int  # finished trials that trained
    epochs: int  # epochs they trained
    running: int  # trials claimed and not finished
    by_state: dict[str, int]  # finished trials that trained, by Optuna state

    @classmethod
    def of(cls, trials: list[FrozenTrial]) -> "Spent":
        done = [t for t in trials if t.state.is_finished() and trained(t)]
        states: dict[str, int] = {}
        for t in done:
            states[t.state.name] = states.get(t.state.name, 0) + 1
        return cls(len(done), sum(epochs_of(t) for t in done), sum(t.state == TrialState.RUNNING for t in trials), states)


@dataclass(frozen=True)
class Budget:
    trials: int | None  # None: no limit on the count
    epochs: int | None  # None: no limit on the epochs
    per_trial: int  # epochs of one full trial

    def done(self, s: Spent) -> bool:
        return (self.trials is not None and s.trials >= self.trials) or (self.epochs is not None and s.epochs >= self.epochs)

    def room(self, s: Spent) -> bool:
        """Whether one more trial may be claimed, counting every running trial as if it trains to the end."""
        if self.trials is not None and s.trials + s.running >= self.trials:
            return False
        return self.epochs is None or s.epochs + s.running * self.per_trial < self.epochs

    def claimable(self, s: Spent) -> int | None:
        """How many more trials may be claimed now (room() would say yes that many times); None: no limit."""
        left = []
        if self.trials is not None:
            left.append(self.trials - s.trials - s.running)
        if self.epochs is not None:
            left.append(-(-(self.epochs - s.epochs - s.running * self.per_trial) // self.per_trial))
        return max(0, min(left)) if left else None

    def progress(self, s: Spent) -> tuple[int, int]:
        """(done, total) in the budget's own unit, for a progress bar."""
        if self.epochs is not None and (self.trials is None or s.epochs / self.epochs >= s.trials / self.trials):
            return min(s.epochs, self.epochs), self.epochs
        return min(s.trials, self.trials), self.trials

    def describe(self) -> str:
        parts = ([f"{self.trials} trials"] if self.trials is not None else []) + \
                ([f"{self.epochs} epochs"] if self.epochs is not None else [])
        return " or ".join(parts)

    @staticmethod
    def read(text: str) -> dict[str, int | None]:
        """describe()'s words back as numbers, {"trials": N or None, "epochs": E or None} (for `status --json`)."""
        found = {unit: int(n) for n, unit in re.findall(r"(\d+) (trials|epochs)", text or "")}
        return {"trials": found.get("trials"), "epochs": found.get("epochs")}

    def spent_text(self, s: Spent) -> str:
        states = ", ".join(f"{n} {k.lower()}" for k, n in sorted(s.by_state.items()))
        return f"{s.trials} trials trained ({states or 'none'}), {s.epochs} epochs"
