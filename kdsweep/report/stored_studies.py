"""The studies of one dataset and teacher -> student pair, read back from MLflow (for confirm and report).

MLflow is the source of truth: the studies, their trials, confirmation runs
and checkpoints are read through the tracking client only, so a remote
tracking server works as well as the local SQLite store.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from kdsweep.common.errors import UserError
from kdsweep.common.space import Float
from kdsweep.common.uris import redact
from kdsweep.data.device_data import DeviceData
from kdsweep.data.dispatch import get_dataset, load_data
from kdsweep.study.best import best_run
from kdsweep.study.config import shared_per_trial
from kdsweep.tracking.tracker import Tracker
from kdsweep.tracking.vocabulary import (
    RUN_FINISHED,
    STATE_COMPLETE,
    STATE_FAIL,
    STATE_ORPHANED,
    STATE_PRUNED,
    STATE_TAG,
)

REFERENCE = "ce"  # the baseline every method is compared with; the only method named here
TEACHERS_EXPERIMENT = "teachers"
Say = Callable[[str], None]


# ---------------------------------------------------------------- reading MLflow


@dataclass
class StudyRuns:
    """One study as MLflow holds it: the parent run, its trial runs, its confirmation runs."""

    run: Any  # mlflow Run of the study (kdsweep.role=study)
    trials: list
    confirms: list  # COMPLETE confirmation runs of the current best config
    best: Any | None = None  # the best COMPLETE trial run

    @property
    def name(self) -> str:
        return self.run.data.tags["kdsweep.study"]

    @property
    def method(self) -> str:
        return self.run.data.tags.get("kdsweep.method") or self.run.data.params.get("method", "?")

    @property
    def params(self) -> dict[str, str]:
        return self.run.data.params

    @property
    def label(self) -> str:
        """The study file's stem (or method): what the report calls the study."""
        tag = self.run.data.tags.get("kdsweep.label")
        if tag:
            return tag
        # Studies from before the tag: the name without its shared '-dataset-teacher-student-sSEED' suffix.
        p = self.params
        suffix = f"-{p.get('dataset')}-{p.get('teacher')}-{p.get('student')}-s{p.get('seed')}"
        return self.name[: -len(suffix)] if self.name.endswith(suffix) and len(self.name) > len(suffix) else self.name

    @property
    def per_trial(self) -> str:
        """What one trial computes, as in the study's name (e.g. e5-b32)."""
        p = self.params
        return self.run.data.tags.get("kdsweep.per_trial") or f"e{p.get('epochs')}-b{p.get('batch_size')}"

    @property
    def uses_teacher(self) -> bool:
        """Whether its trials distilled from a teacher (they recorded one's digest)."""
        return bool(self.params.get("teacher_sha256"))

    @property
    def teacher_seed(self) -> int:
        """The seed its teacher was initialised and trained with (studies from before teacher seeds: the seed)."""
        return int(self.params.get("teacher_seed", self.params.get("seed", 0)))

    @property
    def teacher_control(self) -> str:
        """'untrained' for a control study's teacher, '' for a trained one."""
        control = self.params.get("teacher_control", "none")
        return "" if control == "none" else control

    @property
    def budget(self) -> str:
        """The stopping rule it last ran with, e.g. '60 epochs' ('' for studies from before budgets)."""
        return self.run.data.tags.get("kdsweep.budget", "")

    def counts(self) -> dict[str, int]:
        c = Counter(r.data.tags.get(STATE_TAG, "") for r in self.trials)
        return {"complete": c[STATE_COMPLETE], "pruned": c[STATE_PRUNED], "failed": c[STATE_FAIL]}

    def _trained(self) -> list:
        """Trial runs that trained: complete, pruned, and failed ones that logged their epochs (diverged)."""
        return [r for r in self.trials if r.data.tags.get(STATE_TAG) in (STATE_COMPLETE, STATE_PRUNED)
                or "epochs_trained" in r.data.metrics]

    def epochs_trained(self) -> int:
        def epochs(r) -> int:
            m = r.data.metrics
            if "epochs_trained" in m:
                return int(m["epochs_trained"])
            if r.data.tags.get(STATE_TAG) == STATE_PRUNED:  # older runs: pruned after this (0-based) epoch
                return int(r.data.tags.get("kdsweep.pruned_at_epoch", -1)) + 1
            return int(r.data.params.get("epochs", 0))
        return sum(epochs(r) for r in self._trained())

    def train_seconds(self) -> float:
        return float(sum(r.data.metrics.get("train_seconds", 0.0) for r in self._trained()))

    def searched(self) -> list[str]:
        return [k[len("space."):] for k in self.params if k.startswith("space.")]

    def fixed(self) -> list[str]:
        return [k[len("fixed."):] for k in self.params if k.startswith("fixed.")]

    def space(self) -> dict[str, Float]:
        """The searched ranges, as logged (Float.to_param, or older stores' text); unreadable ones are left out."""
        ranges = {k: Float.from_param(self.params.get(f"space.{k}", "")) for k in self.searched()}
        return {k: v for k, v in ranges.items() if v is not None}

    def best_params(self) -> dict[str, float]:
        p = self.best.data.params if self.best is not None else {}
        return {k: float(p[k]) for k in self.searched() if k in p}



@dataclass
class Selection:
    tracker: Tracker
    experiment_id: str
    experiment: str
    dataset: str
    teacher: str
    student: str
    seed: int
    studies: list[StudyRuns] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the selection left out, for the report

    @property
    def reference(self) -> StudyRuns | None:
        refs = [s for s in self.studies if s.method == REFERENCE]
        return next((s for s in refs if s.label == REFERENCE), refs[0] if refs else None)


def search_all(client, experiment_id: str, flt: str = "") -> list:
    """Every active run of an experiment matching `flt`, page by page."""
    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=flt, max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def open_tracker(uri: str | None) -> Tracker:
    """The tracking store to read, refusing to create an empty local one."""
    from kdsweep.common.uris import absolute_sqlite
    from kdsweep.tracking.tracker import default_tracking_uri

    u = absolute_sqlite(uri or default_tracking_uri())
    if u.startswith("sqlite:///") and not Path(u[len("sqlite:///"):]).is_file():
        raise UserError(f"no MLflow store at {u}: run `kdsweep study` first (or pass --tracking-uri)")
    return Tracker(u)


def kdsweep_experiments(tracker: Tracker) -> dict[str, tuple[str, str, str]]:
    """kdsweep's experiments: name -> (dataset, teacher, student), from the experiment's tags (study.pair_tags) or,
    for stores written before them, from the name (a spec's path may hold '/', the pair then none)."""
    out = {}
    for e in tracker.client.search_experiments(filter_string="name LIKE 'kdsweep/%'"):
        t = e.tags
        if all(f"kdsweep.{k}" in t for k in ("dataset", "teacher", "student")):
            out[e.name] = (t["kdsweep.dataset"], t["kdsweep.teacher"], t["kdsweep.student"])
        elif "->" in e.name and e.name.count("/") >= 2:
            dataset, pair = e.name[len("kdsweep/"):].rsplit("/", 1)
            out[e.name] = (dataset, *pair.split("->", 1))
    return dict(sorted(out.items()))


def select(tracker: Tracker, dataset: str | None = None, teacher: str | None = None, student: str | None = None,
           seed: int | None = None, studies: list[str] | None = None, per_trial: str | None = None) -> Selection:
    """The studies of one dataset, teacher -> student pair, seed and per-trial budget, read from MLflow.

    Studies whose trials compute different things (other epochs, batch size...)
    are not compared: without `per_trial` (or an explicit list of `studies`)
    the per-trial settings of the studies that last ran a trial are chosen (what the
    user just ran), and the others named in the first of `sel.notes`.
    """
    experiment, dataset, teacher, student = _choose_experiment(tracker, dataset, teacher, student)
    exp_id = tracker.client.get_experiment_by_name(experiment).experiment_id
    # Runs retired by `kdsweep study --on-mismatch repair` belong to no Optuna study: never a best trial.
    runs = [r for r in search_all(tracker.client, exp_id) if r.data.tags.get(STATE_TAG) != STATE_ORPHANED]
    by_role: dict[str, list] = {}
    for r in runs:
        by_role.setdefault(r.data.tags.get("kdsweep.role", ""), []).append(r)
    parents, seed = _parents_of_seed(tracker, experiment, by_role.get("study", []), seed)

    sel = Selection(tracker, exp_id, experiment, dataset, teacher, student, seed)
    sel.studies = [_study_runs(p, by_role) for p in parents]
    if studies:
        _keep_named(sel, studies)
    _choose_per_trial(sel, per_trial, explicit=bool(studies))
    sel.studies.sort(key=lambda s: s.label)
    return sel


def _choose_experiment(tracker: Tracker, dataset: str | None, teacher: str | None,
                       student: str | None) -> tuple[str, str, str, str]:
    """(experiment, dataset, teacher, student) of the pair asked for: the store's only one when none is named."""
    names = kdsweep_experiments(tracker)
    if not names:
        raise UserError(f"no kdsweep studies in the tracking store {redact(tracker.uri)}: run `kdsweep study` first")
    if dataset is None and teacher is None and student is None:
        if len(names) > 1:
            raise UserError(f"the store holds several pairs ({', '.join(n[len('kdsweep/'):] for n in names)}); "
                            f"choose one with --dataset (and --teacher/--student)")
        experiment = next(iter(names))
        return (experiment, *names[experiment])
    spec = get_dataset(dataset or "cifar10")
    dataset, teacher, student = spec.name, teacher or spec.teacher, student or spec.student
    if not (teacher and student):  # a spec has no default pair: the one pair its studies used, if only one
        found = [(t, s) for d, t, s in names.values() if d == dataset]
        pairs = [f"{t}->{s}" for t, s in found]
        if len(found) == 1:
            teacher, student = teacher or found[0][0], student or found[0][1]
        else:
            raise UserError(f"{dataset} has no default pair: choose one with --teacher and --student"
                            + (f" ({', '.join(pairs)})" if pairs else f"; no studies of it in {redact(tracker.uri)}"))
    # Found by its pair, not its name: a spec's experiment is named short (StudyConfig.experiment_name), or by its
    # whole path in stores written before.
    experiment = next((n for n, pair in names.items() if pair == (dataset, teacher, student)), None)
    if experiment is None:
        raise UserError(f"no studies of {dataset} {teacher}->{student} in {redact(tracker.uri)}; "
                        f"it holds: {', '.join(n[len('kdsweep/'):] for n in names)}")
    return experiment, dataset, teacher, student


def _parents_of_seed(tracker: Tracker, experiment: str, parents: list, seed: int | None) -> tuple[list, int]:
    """The study runs of one seed (the only seed there when none is asked for), and that seed."""
    seeds = sorted({int(r.data.params.get("seed", 0)) for r in parents})
    if not parents:
        raise UserError(f"no studies in experiment {experiment!r} of {redact(tracker.uri)}: run `kdsweep study` first")
    if seed is None:
        if len(seeds) > 1:
            raise UserError(f"{experiment} holds studies with seeds {', '.join(map(str, seeds))}; choose one with --seed")
        seed = seeds[0]
    parents = [r for r in parents if int(r.data.params.get("seed", 0)) == seed]
    if not parents:
        raise UserError(f"no studies with seed {seed} in {experiment} (seeds there: {', '.join(map(str, seeds))})")
    return parents, seed


def _study_runs(parent, by_role: dict[str, list]) -> StudyRuns:
    """One study's parent run with its trials, best trial and the confirmations of that best trial."""
    name = parent.data.tags["kdsweep.study"]
    trials = [r for r in by_role.get("trial", []) if r.data.tags.get("kdsweep.study") == name]
    s = StudyRuns(parent, trials, [])
    s.best = best_run(trials)
    if s.best is not None:
        s.confirms = [r for r in by_role.get("confirm", [])
                      if r.data.tags.get("kdsweep.study") == name and r.data.tags.get(STATE_TAG) == STATE_COMPLETE
                      and r.data.tags.get("kdsweep.source_run") == s.best.info.run_id]
    return s


def _keep_named(sel: Selection, studies: list[str]) -> None:
    """Only the studies named (by label or full name); a name not there is an error."""
    want = set(studies)
    sel.studies = [s for s in sel.studies if s.label in want or s.name in want]
    missing = want - {s.label for s in sel.studies} - {s.name for s in sel.studies}
    if missing:
        raise UserError(f"no study {', '.join(sorted(missing))} in {sel.experiment} (seed {sel.seed}); "
                        f"there: {', '.join(s.label for s in sel.studies) or 'none of those'}")


def _choose_per_trial(sel: Selection, per_trial: str | None, explicit: bool) -> None:
    groups: dict[str, list[StudyRuns]] = {}
    for s in sel.studies:
        groups.setdefault(s.per_trial, []).append(s)
    if per_trial is not None:
        if per_trial not in groups:
            raise UserError(f"no studies with per-trial settings {per_trial!r} in {sel.experiment} (seed {sel.seed}); "
                            f"there: {', '.join(sorted(groups))}")
        chosen = per_trial
    elif explicit or len(groups) < 2:
        return
    else:  # what the user just ran: the settings whose studies last started a trial (or were created)
        chosen = max(groups, key=lambda k: max(_last_active(s) for s in groups[k]))
    shared = shared_per_trial(chosen)  # another teacher's block: the teacher-free studies (ce) are shared with it
    sel.studies = groups[chosen] + [s for s in groups.get(shared, []) if shared != chosen and not s.uses_teacher]
    others = "; ".join(f"{k}: {', '.join(sorted(s.label for s in v))}" for k, v in sorted(groups.items()) if k != chosen)
    if others:
        how = "the most recent" if per_trial is None else "as asked"
        sel.notes.insert(0, f"studies with per-trial settings {chosen} ({how}) are compared; also in the store "
                            f"(choose with --per-trial): {others}")


def _last_active(s: StudyRuns) -> int:
    """When a study last started a trial (or, with none, was created): ms since the epoch, as MLflow keeps it."""
    return max([s.run.info.start_time or 0] + [r.info.start_time or 0 for r in s.trials])


def confirm_seeds(study_seed: int, k: int) -> list[int]:
    """The fresh seeds of `kdsweep confirm --seeds k`: fixed, so a larger k extends a smaller one."""
    return [study_seed + 1 + i for i in range(k)]


# ---------------------------------------------------------------- checkpoints and data


def split_data(params: dict[str, str], data_dir: str | None, device: torch.device, stream_seed: int | None = None) -> DeviceData:
    """The splits a study trained on, rebuilt from its logged params.

    `data_size` is logged after the validation slice left, so the size asked
    of the loader is data_size + val_size; with the same seed and val_fraction
    that reproduces the same train/val/test split.
    """
    try:
        n = int(params["data_size"]) + int(params["val_size"])
        if data_dir is None and params.get("data_source") == "torchvision":  # where the study read it
            data_dir = params.get("data_path") or None
        image_size = int(params["image_size"]) if params.get("image_size") else None
        return load_data(params["dataset"], data_dir, n, int(params["seed"]), float(params["val_fraction"]), device, stream_seed,
                         image_size=image_size, preprocess=params.get("preprocess"))  # absent: older studies standardized
    except KeyError as e:
        raise UserError(f"study run lacks the param {e.args[0]!r}; it was not written by kdsweep study") from None


def download(tracker: Tracker, run_id: str, path: str, dst: Path) -> Path | None:
    d = dst / run_id
    d.mkdir(parents=True, exist_ok=True)
    try:
        return Path(tracker.client.download_artifacts(run_id, path, str(d)))
    except Exception:
        return None


def _teacher_files(sel: Selection, dst: Path, say: Say):
    """Where the studies' teacher may be, best first: (path, where it came from); the reason it is missing last."""
    named = Counter(s.params.get("teacher_checkpoint", "") for s in sel.studies)
    named.pop("", None)
    if len(named) > 1:
        say(f"note: the studies used {len(named)} different teacher checkpoints; the report uses the most common one")
    wanted = named.most_common(1)[0][0] if named else None
    if wanted and Path(wanted).is_file():
        yield Path(wanted), wanted
    exp = sel.tracker.client.get_experiment_by_name(TEACHERS_EXPERIMENT)
    if exp is not None:
        runs = search_all(sel.tracker.client, exp.experiment_id, f"tags.`kdsweep.dataset` = '{sel.dataset}'")
        seeds = {str(s.teacher_seed) for s in sel.studies if s.uses_teacher} or {str(sel.seed)}
        controls = {s.teacher_control for s in sel.studies if s.uses_teacher} or {""}
        runs = [r for r in runs if r.data.params.get("arch") == sel.teacher and r.data.params.get("seed") in seeds
                and r.data.params.get("control", "") in controls and r.info.status == RUN_FINISHED]
        if wanted:
            runs = [r for r in runs if r.data.tags.get("kdsweep.checkpoint") == wanted]
        for r in sorted(runs, key=lambda r: -r.info.start_time):
            ckpt = Path(r.data.tags.get("kdsweep.checkpoint", "teacher.pt")).name
            got = download(sel.tracker, r.info.run_id, f"checkpoint/{ckpt}", dst / r.info.run_id)
            if got is not None:
                yield got, f"run {r.info.run_id} of experiment {TEACHERS_EXPERIMENT!r}"
    if wanted:
        yield None, f"teacher checkpoint {wanted} is not on this machine, nor logged in MLflow"
    else:
        yield None, "no study names a teacher checkpoint (only teacher-free methods ran)"


def load_teacher(sel: Selection, dst: Path, say: Say, in_shape: tuple[int, ...], num_classes: int,
                 **taps: str) -> tuple[Any, dict, str]:
    """The teacher the studies distilled from, as (model or None, checkpoint payload, where it came from or why
    it is missing), checked against the weight digest the studies recorded.

    A file at the studies' path that holds another teacher (the cache replaced after the study) is passed over
    for the one logged in MLflow; when no file holds the recorded weights, it is refused in one line naming both
    digests: confirmation seeds and teacher metrics from another teacher would be silently wrong.
    """
    from kdsweep.common.digests import model_digest
    from kdsweep.training import checkpoint

    recorded = {s.params.get("teacher_sha256", "") for s in sel.studies} - {""}
    other = None
    for path, where in _teacher_files(sel, dst, say):
        if path is None:
            if other is not None:
                raise UserError(f"the teacher at {other[0]} is not the one the studies distilled from: its weights hash "
                                f"to {other[1][:12]}, the studies recorded {', '.join(d[:12] for d in sorted(recorded))}; "
                                f"put that teacher back (or run the studies again with this one)")
            return None, {}, where
        model, payload = checkpoint.load_model(path, sel.teacher, in_shape, num_classes, **taps)
        digest = model_digest(model)
        if not recorded or digest in recorded:
            if other is not None:
                say(f"note: {other[0]} holds another teacher now; using the studies' own from {where}")
            return model, payload, where
        other = other or (path, digest)
    raise AssertionError("_teacher_files ends with the reason a teacher is missing")


def data_key(params: dict[str, str]) -> tuple:
    return tuple(params.get(k) for k in ("dataset", "image_size", "data_size", "val_size", "seed", "val_fraction"))

