"""What a running study prints, chosen by where its output goes (issue 13).

  bars   stdout and stderr are a terminal: tqdm bars, as always;
  lines  stdout is a file or a pipe (nohup, CI, `| tee`): no bars, which a log
         cannot show, but one plain line per finished trial and one per study,
         flushed at once, so `tail -f` shows progress as it happens;
  quiet  (--quiet) nothing while it runs: stdout carries only the summary the
         command prints at the end; notes and warnings go to stderr.

Epochs in these lines count from 1, as people do; Optuna's steps and MLflow's
metric steps count from 0 (README, "Epochs").
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from kdsweep.tracking.vocabulary import EPOCHS_ATTR, REASON_ATTR, STATE_COMPLETE, STATE_FAIL, STATE_PRUNED

MODES = ("bars", "lines", "quiet")


def _tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def _print(line: str) -> None:
    print(line, flush=True)


class Reporter:
    """The one place a study's progress is written; study/outcome.py and loop.py call it where trials and studies end."""

    def __init__(self, mode: str, write: Callable[[str], None] = _print):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} not in {MODES}")
        self.mode, self.write = mode, write

    @classmethod
    def auto(cls, quiet: bool = False) -> "Reporter":
        """Bars in a terminal, lines when stdout goes elsewhere, nothing with `quiet`."""
        if quiet:
            return cls("quiet")
        return cls("bars" if _tty(sys.stdout) and _tty(sys.stderr) else "lines")

    @property
    def bars(self) -> bool:
        return self.mode == "bars"

    @property
    def lines(self) -> bool:
        return self.mode == "lines"

    def say(self, msg: str) -> None:
        """A study's notes: flushed (a log shows them in order with the trial lines); on stderr when quiet."""
        if self.mode == "quiet":
            print(msg, file=sys.stderr, flush=True)
        else:
            print(msg, flush=True)

    def study_start(self, name: str, what: str) -> None:
        if self.lines:
            self.write(f"study {name}: {what}")

    def trial_end(self, label: str, trial: Any) -> None:
        """One line for a finished trial (an Optuna FrozenTrial, as stored after it was told)."""
        if self.lines:
            self.write(trial_line(label, trial))


def _seconds(trial: Any) -> str:
    start, end = getattr(trial, "datetime_start", None), getattr(trial, "datetime_complete", None)
    return f"{(end - start).total_seconds():.1f}" if start and end else "-"


def trial_line(label: str, trial: Any) -> str:
    """`vanilla_kd trial 3: COMPLETE val_acc=0.9531 epochs=5 seconds=12.3 alpha=0.5 lr=0.01 temperature=4`.

    val_acc is the objective: the best validation accuracy the trial reached (for a pruned or failed
    trial, up to where it stopped).
    """
    state = trial.state.name
    steps = dict(trial.intermediate_values or {})
    if state == STATE_COMPLETE and trial.value is not None:
        val = f"{trial.value:.4f}"
    else:
        val = f"{max(steps.values()):.4f}" if steps else "-"
    epochs = trial.user_attrs.get(EPOCHS_ATTR, len(steps))
    head = state
    if state == STATE_PRUNED and steps:
        head += f" after epoch {max(steps) + 1}"  # Optuna's step is the 0-based epoch
    params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(trial.params.items()))
    line = f"{label} trial {trial.number}: {head} val_acc={val} epochs={epochs} seconds={_seconds(trial)} {params}".rstrip()
    reason = trial.user_attrs.get(REASON_ATTR)
    if state == STATE_FAIL and reason:
        line += f" ({reason})"
    return line
