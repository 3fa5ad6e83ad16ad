"""A study's full configuration, resolved once: built-in defaults < study file < CLI flags.

A study file `studies/NAME.toml` names a method and may override defaults
and search ranges:

    method = "vanilla_kd"
    [defaults]                      # any `kdsweep study` option
    epochs = 10
    [search]                        # narrow or widen a searched range
    temperature = { low = 1.0, high = 20.0, log = true }
    [fixed]                         # stop searching a parameter: use this value
    alpha = 0.9
"""

from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, get_args, get_type_hints

from .data import get_dataset
from .errors import UserError
from .methods import get_method
from .models import check_arch
from .space import LR, Float, apply_overrides

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
DEVICES = ("auto", "cuda", "cpu")
STUDIES_DIR = Path("studies")


@dataclass
class StudyConfig:
    method: str
    name: str  # the study file's stem, or the method name
    dataset: str = "cifar10"
    data_dir: str | None = None
    data_size: int | None = None
    val_fraction: float = 0.1
    teacher: str | None = None  # None: the dataset's default pair
    student: str | None = None
    teacher_epochs: int | None = None
    teacher_checkpoint: str | None = None
    seed: int = 0
    epochs: int | None = None
    batch_size: int | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    trials: int = 20
    sampler: str = "tpe"
    pruner: str = "median"
    storage: str | None = None
    tracking_uri: str | None = None
    device: str = "auto"
    timeout: float | None = None
    study_name: str | None = None
    # Performance only: they never change what a trial computes beyond float rounding.
    parallel: int = 1  # trials trained in lockstep on the same batches
    teacher_cache_mb: float | None = None  # None: sized to the device; 0: off
    compile: bool = False
    channels_last: bool = True
    cpu_workers: int | None = None  # CPU: worker threads of a lockstep group (None: the cores; 0: off)
    space: dict[str, Float] = field(default_factory=dict)
    fixed: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        spec = get_dataset(self.dataset)
        self.teacher = check_arch(self.teacher or spec.teacher)
        self.student = check_arch(self.student or spec.student)
        self.teacher_epochs = self.teacher_epochs or spec.teacher_epochs
        self.epochs = self.epochs or spec.epochs
        self.batch_size = self.batch_size or spec.batch_size
        if not 0 < self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.data_size is not None and self.data_size < 10:
            raise UserError(f"--data-size must be at least 10, got {self.data_size}")
        for name in ("trials", "epochs", "batch_size", "teacher_epochs", "parallel"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {self.sampler!r}; choose from {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise UserError(f"unknown pruner {self.pruner!r}; choose from {', '.join(PRUNERS)}")
        if self.device not in DEVICES:
            raise UserError(f"unknown device {self.device!r}; choose from {', '.join(DEVICES)}")
        if self.cpu_workers is not None and self.cpu_workers < 0:
            raise UserError(f"--cpu-workers must be >= 0, got {self.cpu_workers}")
        if self.teacher_cache_mb is not None and not self.teacher_cache_mb >= 0:
            raise UserError(f"--teacher-cache-mb must be >= 0 (0 disables the cache), got {self.teacher_cache_mb}")
        if self.timeout is not None and self.timeout <= 0:
            raise UserError(f"--timeout must be positive seconds, got {self.timeout}")
        if self.study_name is not None:
            sanitize(self.study_name)  # a name with no usable characters fails here, before anything is written

    @property
    def full_study_name(self) -> str:
        """Optuna study name: one study per (method config, dataset, pair, seed)."""
        if self.study_name:
            return sanitize(self.study_name)
        return sanitize(f"{self.name}-{self.dataset}-{self.teacher}-{self.student}-s{self.seed}")

    @property
    def experiment_name(self) -> str:
        """MLflow experiment: one per dataset and teacher->student pair, so methods sit side by side."""
        return f"kdsweep/{self.dataset}/{self.teacher}->{self.student}"

    def fingerprint(self) -> dict[str, Any]:
        """What must not change when a study is resumed (else its trials are not comparable)."""
        keys = ("method", "dataset", "data_size", "val_fraction", "teacher", "student", "seed", "epochs",
                "batch_size", "momentum", "weight_decay", "teacher_epochs")
        fp = {k: getattr(self, k) for k in keys}
        fp["space"] = {k: asdict(v) for k, v in sorted(self.space.items())}
        fp["fixed"] = dict(sorted(self.fixed.items()))
        return fp


def sanitize(name: str) -> str:
    """Study names become file and run names: keep them to a safe alphabet."""
    clean = re.sub(r"[^A-Za-z0-9_.>-]+", "_", name).strip("._")
    if not clean:
        raise UserError(f"study name {name!r} has no usable characters")
    return clean[:200]


_FILE_KEYS = {"method", "description", "defaults", "search", "fixed"}
_DEFAULT_KEYS = {f.name for f in fields(StudyConfig)} - {"method", "name", "space", "fixed", "study_name"}


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
    """The type a [defaults] key must have: StudyConfig's annotation of the field, without its None."""
    hint = get_type_hints(StudyConfig)[key]
    kinds = [t for t in (get_args(hint) or (hint,)) if t is not type(None)]
    return (kinds[0], _WORDS[kinds[0]]) if len(kinds) == 1 and kinds[0] in _WORDS else None


def _is(value: Any, kind: type) -> bool:
    """TOML's value as the field's type: an integer is a number, but true is not 1 and "32" is not 32."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def find_study(name: str, studies_dir: Path = STUDIES_DIR) -> tuple[str, dict[str, Any]]:
    """Resolve NAME: a path to a .toml, a file studies/NAME.toml, or a bare method name."""
    path = Path(name)
    if name.endswith(".toml"):
        if not path.is_file():
            raise UserError(f"study file {name} not found")
        return path.stem, read_study_file(path)
    candidate = studies_dir / f"{name}.toml"
    if candidate.is_file():
        return name, read_study_file(candidate)
    get_method(name)  # raises with the list of known methods
    return name, {"method": name}


def resolve(name: str, cli: Mapping[str, Any], studies_dir: Path = STUDIES_DIR) -> StudyConfig:
    """Build the StudyConfig for `kdsweep study NAME` from the study file and the flags actually given."""
    stem, doc = find_study(name, studies_dir)
    method = get_method(doc["method"])
    values: dict[str, Any] = dict(doc.get("defaults", {}))
    values.update({k: v for k, v in cli.items() if v is not None})
    space, fixed = apply_overrides({**method.space, "lr": LR}, doc.get("search", {}), doc.get("fixed", {}))
    try:
        return StudyConfig(method=method.name, name=stem, space=space, fixed=fixed, **values)
    except TypeError as e:
        raise UserError(f"bad study option: {e}") from None
