"""A study's full configuration, resolved once: built-in defaults < study file < CLI flags.

`kdsweep study NAME` runs the method NAME with its own search ranges (methods/). A study file,
always given by its path (`kdsweep study path/to/mine.toml`; studies/ ships one template per
method), names a method and holds only what it changes; its stem labels the study:

    method = "vanilla_kd"
    [defaults]                      # any `kdsweep study` option
    epochs = 10
    [search]                        # narrow or widen a searched range
    temperature = { low = 2.0, high = 8.0, log = true }
    [fixed]                         # stop searching a parameter: use this value
    alpha = 0.9
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from kdsweep.common.errors import UserError
from kdsweep.common.space import Float, apply_overrides, lr_range
from kdsweep.data import inputs
from kdsweep.data.dispatch import dataset_shape, get_dataset
from kdsweep.data.sources import name_tag
from kdsweep.methods.registry import METHODS, get_method
from kdsweep.models.factory import check_arch
from kdsweep.study import settings
from kdsweep.study.budget import Budget
from kdsweep.study.settings import DEFAULT_TRIALS, StudySettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_NAME = 200


@dataclass(kw_only=True)
class StudyConfig(StudySettings):
    """A study's settings (the schema, settings.py) and what its method and study file decide, resolved once."""

    method: str
    name: str  # the study file's stem, or the method name: what the study is labelled
    study_file: str | None = None  # the study file as given, or None (a method by its name)
    space: dict[str, Float] = field(default_factory=dict)
    fixed: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        spec = get_dataset(self.dataset)
        self.dataset = spec.name  # a spec as recorded: an image folder by its absolute path
        if not spec.teacher and not (self.teacher and self.student):
            raise UserError(f"dataset {self.dataset} has no default teacher and student: pass --teacher and --student")
        settings.check(self)  # choices and bounds, as the schema declares them, before any data is read
        self.preprocess = inputs.parse(self.preprocess).text  # refused here when it cannot be read
        in_shape, _ = dataset_shape(self.dataset, self.data_dir, self.image_size)  # a spec's data is read (once) here
        self.teacher = check_arch(self.teacher or spec.teacher, in_shape)
        self.student = check_arch(self.student or spec.student, in_shape)
        self.teacher_epochs = self.teacher_epochs or spec.teacher_epochs
        self.epochs = self.epochs or spec.epochs
        self.batch_size = self.batch_size or spec.batch_size
        self.optimizer = self.optimizer or spec.optimizer
        self.weight_decay = spec.weight_decay if self.weight_decay is None else self.weight_decay
        if self.trials is None and self.budget_epochs is None:
            self.trials = DEFAULT_TRIALS
        for role in ("teacher", "student"):
            for tap in ("feature", "embedding"):
                path = getattr(self, f"{role}_{tap}")
                if path is not None and (not isinstance(path, str) or not path.strip()):
                    raise UserError(f"--{role}-{tap} must name a module path (e.g. layer4), got {path!r}")
        if self.teacher_checkpoint and (self.teacher_seed is not None or self.teacher_control):
            raise UserError("--teacher-seed and --teacher-control choose the cached teacher; --teacher-checkpoint gives "
                            "one: use one or the other")
        if self.study_name is not None:
            sanitize(self.study_name)  # a name with no usable characters fails here, before anything is written

    @property
    def budget_tag(self) -> str:
        """What one trial computes, readably: epochs and batch size always, other settings when not the defaults
        (the dataset's, for the optimiser and weight decay).

        Part of the study name, so a study with another per-trial budget is
        another study (found again by the same command), never a collision.
        """
        spec = get_dataset(self.dataset)
        parts = [f"e{self.epochs}", f"b{self.batch_size}"]
        if self.optimizer != spec.optimizer:
            parts.append(self.optimizer)
        defaults = {**{f.name: f.default for f in fields(StudyConfig)}, "weight_decay": spec.weight_decay}
        for key, token in (("momentum", "m"), ("weight_decay", "wd"), ("val_fraction", "v"), ("data_size", "n"),
                           ("image_size", "i")):
            if getattr(self, key) != defaults[key]:
                parts.append(f"{token}{getattr(self, key):g}")
        if self.teacher_epochs != spec.teacher_epochs:  # for ce too: its studies then group with the KD studies they serve
            parts.append(f"te{self.teacher_epochs}")
        if self.teacher_tag:
            parts.append(self.teacher_tag)
        if inputs.parse(self.preprocess).tag:  # other inputs: another computation (the default adds nothing)
            parts.append(inputs.parse(self.preprocess).tag)
        return "-".join(parts)

    @property
    def resolved_teacher_seed(self) -> int:
        """The seed the teacher is initialised and trained with: --teacher-seed, else --seed."""
        return self.seed if self.teacher_seed is None else self.teacher_seed

    @property
    def teacher_tag(self) -> str:
        """Which teacher a study distils from when not the default one (ts2, untrained, ts2-untrained), '' otherwise.

        A method without a teacher computes the same thing whatever the teacher: its tag stays '', so one study of
        it serves every teacher seed's block (the report adds it to them: shared_per_trial)."""
        if not get_method(self.method).uses_teacher:
            return ""
        parts = [f"ts{self.teacher_seed}"] if self.teacher_seed is not None and self.teacher_seed != self.seed else []
        return "-".join(parts + ([self.teacher_control] if self.teacher_control else []))

    @property
    def requested_study_name(self) -> str:
        """The study name as asked for (or built), before sanitize."""
        return self.study_name or f"{self.name}-{name_tag(self.dataset)}-{self.teacher}-{self.student}-s{self.seed}-{self.budget_tag}"

    @property
    def full_study_name(self) -> str:
        """Optuna study name: one study per (method config, dataset, pair, seed, per-trial budget)."""
        return sanitize(self.requested_study_name)

    @property
    def experiment_name(self) -> str:
        """MLflow experiment: one per dataset and teacher->student pair, so methods sit side by side. A spec is named
        short (an image folder by its folder's name and a digest of its path); the pair's tags hold it whole."""
        return f"kdsweep/{name_tag(self.dataset)}/{self.teacher}->{self.student}"

    @property
    def legacy_experiment_name(self) -> str:
        """The experiment's name before issue 22 (a spec's whole path): a store that holds it keeps using it."""
        return f"kdsweep/{self.dataset}/{self.teacher}->{self.student}"

    @property
    def budget(self) -> Budget:
        return Budget(self.trials, self.budget_epochs, self.epochs)

    def fingerprint(self) -> dict[str, Any]:
        """What must not change when a study is resumed (else its trials are not comparable)."""
        keys = ("method", "dataset", "data_size", "image_size", "val_fraction", "preprocess", "teacher", "student", "seed",
                "epochs", "batch_size", "optimizer", "momentum", "weight_decay", "teacher_epochs", "sampler", "pruner")
        fp = {k: getattr(self, k) for k in keys}
        fp.update(self._tap_fingerprint())
        fp["space"] = {k: v.settings() for k, v in sorted(self.space.items())}
        fp["fixed"] = dict(sorted(self.fixed.items()))
        return fp


    def _tap_fingerprint(self) -> dict[str, str]:
        """The tap paths this method reads (None: found automatically): another layer is another computation, and a
        study keeps one. Paths a method does not read are left out: they cannot make its trials differ."""
        method = get_method(self.method)
        roles = ("student", "teacher") if method.uses_teacher else ("student",)
        return {f"{r}_{t}": getattr(self, f"{r}_{t}") for r in roles for t in ("feature", "embedding") if t in method.needs}


_TEACHER_TOKEN = re.compile(r"-(ts-?\d+|untrained)(?=-|$)")


def shared_per_trial(per_trial: str) -> str:
    """A study's per-trial tag without its teacher tokens: the tag of the teacher-free studies its block shares."""
    return _TEACHER_TOKEN.sub("", per_trial)


def sanitize(name: str) -> str:
    """Study names become file and run names: a safe alphabet, at most MAX_NAME characters, one study per name.

    A name that needs no change is kept as it is. A changed one (characters replaced or dropped,
    or cut to length) ends in a hash of the original, so two names never become one study:
    `研究1` and `調査1` both lose their kanji but are stored under two names, `1-<hash>`.
    """
    clean = re.sub(r"[^A-Za-z0-9_.>-]+", "_", name).strip("._")
    if not clean:
        raise UserError(f"study name {name!r} has no usable characters")
    if clean == name and len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{clean[:MAX_NAME - len(digest) - 1]}-{digest}"


_FILE_KEYS = {"method", "description", "defaults", "search", "fixed"}
_DEFAULT_KEYS = settings.file_keys()  # the schema's settings, less the flags for one start (study_name, on_mismatch)


def read_study_file(path: Path) -> dict[str, Any]:
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot read study file {path}: {e}") from None
    unknown = set(doc) - _FILE_KEYS
    if unknown:
        raise UserError(f"study file {path}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_FILE_KEYS))}")
    if "method" not in doc:
        raise UserError(f"study file {path}: missing `method = \"...\"`")
    for key, kind in (("method", str), ("description", str), ("defaults", dict), ("search", dict), ("fixed", dict)):
        if key in doc and not isinstance(doc[key], kind):
            want = "a table [" + key + "]" if kind is dict else "a string"
            raise UserError(f"study file {path}: {key} must be {want}, got {doc[key]!r}")
    bad = set(doc.get("defaults", {})) - _DEFAULT_KEYS
    if bad:
        raise UserError(f"study file {path}: unknown [defaults] key(s) {', '.join(sorted(bad))}; allowed: {', '.join(sorted(_DEFAULT_KEYS))}")
    for key, value in doc.get("defaults", {}).items():
        want = _expected(key)
        if want and not _is(value, want[0]):
            raise UserError(f"study file {path}: [defaults] {key} must be {want[1]}, got {value!r}")
    for name, spec in doc.get("search", {}).items():
        if isinstance(spec, dict):
            for k, v in spec.items():
                if not _is(v, bool if k == "log" else float):
                    raise UserError(f"study file {path}: [search] {name}.{k} must be "
                                    f"{'true or false' if k == 'log' else 'a number'}, got {v!r}")
    for name, value in doc.get("fixed", {}).items():
        if not _is(value, float):
            raise UserError(f"study file {path}: [fixed] {name} must be a number, got {value!r}")
    return doc


_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _expected(key: str) -> tuple[type, str] | None:
    """The type a [defaults] key must have: the schema's annotation of the setting, without its None."""
    kind = settings.kind(key)
    return (kind, _WORDS[kind]) if kind in _WORDS else None


def _is(value: Any, kind: type) -> bool:
    """TOML's value as the field's type: an integer is a number, but true is not 1 and "32" is not 32."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def is_study_file(name: str) -> bool:
    """NAME is a study file when it reads as a path (ends in .toml or holds a /); a bare name is always a method."""
    return name.endswith(".toml") or "/" in name or os.sep in name


def find_study(name: str) -> tuple[str, dict[str, Any]]:
    """Resolve NAME: a study file by its path, or a method by its name (never a file found in the current directory).

    The file's stem labels its studies, so a file named after one method that runs another is refused:
    `studies/vanilla_kd.toml` saying `method = "ce"` would store ce's trials as vanilla_kd's.
    """
    if not is_study_file(name):
        try:
            get_method(name)  # raises with the list of known methods
        except UserError as e:
            local = Path("studies") / f"{name}.toml"
            hint = f"; a study file is given by its path: kdsweep study {local}" if local.is_file() else ""
            raise UserError(f"{e}{hint}") from None
        return name, {"method": name}
    path = Path(name)
    if not path.is_file():
        raise UserError(f"study file {name} not found")
    doc = read_study_file(path)
    if path.stem in METHODS and path.stem != doc["method"]:
        raise UserError(f"study file {name} is named after the method {path.stem} but says method = {doc['method']!r}; "
                        f"its studies would be labelled {path.stem}: rename the file or set method = {path.stem!r}")
    return path.stem, doc


def resolve(name: str, cli: Mapping[str, Any]) -> StudyConfig:
    """Build the StudyConfig for `kdsweep study NAME` from the study file and the flags actually given."""
    stem, doc = find_study(name)
    method = get_method(doc["method"])
    values: dict[str, Any] = dict(doc.get("defaults", {}))
    values.update({k: v for k, v in cli.items() if v is not None})
    try:
        cfg = StudyConfig(method=method.name, name=stem, study_file=name if is_study_file(name) else None, **values)
    except TypeError as e:
        raise UserError(f"bad study option: {e}") from None
    # The lr range follows the optimiser, which the config has just resolved (flag, file, or the dataset's).
    cfg.space, cfg.fixed = apply_overrides({**method.space, "lr": lr_range(cfg.optimizer)}, doc.get("search", {}),
                                           doc.get("fixed", {}))
    return cfg
