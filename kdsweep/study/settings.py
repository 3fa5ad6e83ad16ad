"""A study's settings, declared once and without torch: each one's type, default, help, choices and bounds.

`StudySettings` is the schema. StudyConfig (config.py) is these settings plus what the method and
study file decide; the command line builds `kdsweep study`/`sweep`/`teacher`/`status` flags from
these fields (flag, type, choices, help with its default), the API takes them as keywords, a study
file takes them as `[defaults]` keys, and `check` enforces their choices and bounds. `kdsweep --help`
reads only this module: it imports no torch, MLflow or Optuna.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import MISSING, Field, dataclass, field, fields
from functools import cache
from typing import Any, get_args, get_type_hints

from kdsweep.common.errors import UserError
from kdsweep.common.space import MOMENTUM, OPTIMIZERS
from kdsweep.data import inputs
from kdsweep.data.catalog import DATASET_NAMES

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
DEVICES = ("auto", "cuda", "cpu")
ON_MISMATCH = ("refuse", "repair", "ignore")  # see store_agreement.py
TEACHER_CONTROLS = ("untrained",)
DEFAULT_TRIALS = 20

# Flag groups, in the order `kdsweep study --help` shows them.
DATA = "data and models"
MODELS = "models"
BUDGET = "budget (the same for every method)"
SEARCH = "search"
SPEED = "speed (results are the same up to float rounding; docs/performance.md)"
TRACKING = "storage and tracking"
INTEGRITY = "integrity"


def setting(default: Any, help: str, group: str, *, default_text: str | None = None, choices: tuple | None = None,
            at_least: float | None = None, above: float | None = None, below: float | None = None,
            metavar: str | None = None, in_file: bool = True) -> Any:
    """A field of the schema. default_text: what the default is when the field's default (None) only means "decided
    later"; at_least/above/below: inclusive and exclusive bounds; in_file=False: a flag for one start, never a
    study file's standing order."""
    meta = {"help": help, "group": group, "default_text": default_text, "choices": choices, "at_least": at_least,
            "above": above, "below": below, "metavar": metavar, "in_file": in_file}
    return field(default=default, metadata=meta)


_MODEL_SPEC = "a built-in name, torchvision:NAME, timm:NAME or package.module:factory"
_PER_DATASET = "the dataset's recipe, in the README's dataset table"  # declared once, in data/builtin.py


@dataclass(kw_only=True)
class StudySettings:
    """Every setting of a study, in the order of `kdsweep study --help`."""

    dataset: str = setting(
        "cifar10", f"one of {', '.join(DATASET_NAMES)}, or your data: imagefolder:PATH (PATH/train/<class>/*.png and "
        "PATH/test/ or PATH/val/), torchvision:NAME (read from --data-dir, never downloaded), package.module:function "
        "(returns train_x, train_y, test_x, test_y); these need --teacher and --student", DATA)
    data_dir: str | None = setting(None, "where real datasets live / are downloaded", DATA,
                                   default_text="$KDSWEEP_DATA, else data/ in $KDSWEEP_CACHE (~/.cache/kdsweep/data)")
    image_size: int | None = setting(None, "resize your dataset's images to NxN (shorter side, then centre crop); needed "
                                     "when its images differ in size", DATA, default_text="as they are", at_least=1,
                                     metavar="N")
    data_size: int | None = setting(None, "training images to use (synthetic: to generate)", DATA,
                                    default_text="all, synthetic 5000", at_least=10)
    val_fraction: float = setting(0.1, "share of the training set held out for validation", DATA, above=0, below=1)
    preprocess: str = setting(
        inputs.DEFAULT, "what the teacher and every student see: uint8 images are scaled to [0, 1] (floats kept), then "
        "standardize: (x - mean) / std with a built-in dataset's statistics or your data's training split's; none: "
        "nothing more; MEAN/STD: your own, one number per channel or one for all (e.g. 0.485,0.456,0.406/0.229,0.224,"
        "0.225); a teacher trained elsewhere needs the preprocessing it was trained with", DATA, metavar="HOW")
    seed: int = setting(0, "seed of the split, augmentation stream, initialisation and sampler", DATA)
    device: str = setting("auto", "where to train; auto: CUDA when there is one", DATA, choices=DEVICES)

    teacher: str | None = setting(None, f"teacher: {_MODEL_SPEC}", MODELS, default_text="the dataset's pair",
                                  metavar="MODEL")
    student: str | None = setting(None, "student, as --teacher", MODELS, default_text="the dataset's pair",
                                  metavar="MODEL")
    # Where a model's taps are read (models/taps.py): the output of the feature path, the input of the embedding path.
    teacher_feature: str | None = setting(None, "module whose output is the teacher's feature map, e.g. layer4", MODELS,
                                          default_text="the last module that yields a spatial map", metavar="PATH")
    teacher_embedding: str | None = setting(None, "module whose input is the teacher's embedding, e.g. fc", MODELS,
                                            default_text="the last nn.Linear", metavar="PATH")
    student_feature: str | None = setting(None, "module whose output is the student's feature map, e.g. layer4", MODELS,
                                          default_text="the last module that yields a spatial map", metavar="PATH")
    student_embedding: str | None = setting(None, "module whose input is the student's embedding, e.g. fc", MODELS,
                                            default_text="the last nn.Linear", metavar="PATH")
    accept_teacher: bool = setting(
        False, "distil from a teacher even when it scores near chance on this study's validation split, or far below "
        "what its checkpoint says it scored (checked before any trial; the acceptance is recorded in MLflow)", MODELS,
        in_file=False)
    teacher_val_acc: float | None = setting(
        None, "the validation accuracy you measured for the teacher you bring (--teacher-checkpoint or a module): one "
        "scoring far below it on this study's validation split is refused before any trial, as for its checkpoint's "
        "own score", MODELS, default_text="none: the checkpoint's own score, if it has one", at_least=0.0, below=1.0001,
        metavar="ACC")
    teacher_epochs: int | None = setting(None, "epochs of a teacher trained when none is cached", MODELS,
                                         default_text=_PER_DATASET, at_least=1)
    teacher_seed: int | None = setting(
        None, "seed of the teacher's initialisation and training batches; the split and the students keep --seed, so "
        "studies with other teacher seeds are blocks that differ only in their teacher", MODELS, default_text="--seed")
    teacher_control: str | None = setting(
        None, "untrained: distil from a randomly initialised teacher of the same architecture, a control block: what "
        "a method gains from it is regularisation, not the teacher's knowledge", MODELS, default_text="none",
        choices=TEACHER_CONTROLS)
    teacher_checkpoint: str | None = setting(
        None, "use this teacher checkpoint instead of the cache: kdsweep's, a plain state_dict or "
        "{\"state_dict\"/\"model\": ...} for --teacher (always loaded with weights_only=True)", MODELS)

    trials: int | None = setting(
        None, "trials that trained (complete, pruned or diverged; trials lost to a killed worker are retried and not "
        "counted) the study should hold; a rerun with a larger N adds the difference", BUDGET,
        default_text=f"{DEFAULT_TRIALS}, or no limit when --budget-epochs is given", at_least=1, metavar="N")
    budget_epochs: int | None = setting(
        None, "training epochs summed over all the study's trials; no trial is claimed once they are spent (pruning "
        "then buys more configurations for the same compute: the fair unit for comparing methods)", BUDGET,
        default_text="none", at_least=1, metavar="E")
    epochs: int | None = setting(None, "epochs per trial", BUDGET, default_text=_PER_DATASET, at_least=1)
    batch_size: int | None = setting(None, "images per training step", BUDGET, default_text=_PER_DATASET, at_least=1)
    optimizer: str | None = setting(None, "sets the searched lr range (kdsweep methods)", BUDGET,
                                    default_text=_PER_DATASET, choices=OPTIMIZERS)
    momentum: float = setting(MOMENTUM, "SGD momentum, or Adam's/AdamW's beta1", BUDGET)
    weight_decay: float | None = setting(None, "L2 weight decay of the optimiser", BUDGET,
                                         default_text=_PER_DATASET)
    timeout: float | None = setting(None, "stop starting new trials after this many seconds", BUDGET, above=0)

    sampler: str = setting("tpe", "Optuna's sampler of each trial's hyperparameters", SEARCH, choices=SAMPLERS)
    pruner: str = setting("median", "Optuna's pruner, which may stop a trial after any epoch", SEARCH, choices=PRUNERS)
    study_name: str | None = setting(
        None, "Optuna study name", SEARCH, in_file=False,
        default_text="NAME-dataset-teacher-student-sSEED-eEPOCHS-bBATCH, plus any non-default optimizer, momentum, "
                     "weight decay, data size or val fraction")

    # Performance only: they never change what a trial computes beyond float rounding.
    parallel: int = setting(1, "ask K trials at once and train their students in lockstep on the same batches", SPEED,
                            at_least=1, metavar="K")
    teacher_cache_mb: float | None = setting(
        None, "memory for teacher outputs shared by all trials; logits are always kept, feature maps while they fit; "
        "0 disables", SPEED, default_text="a quarter of the device's free memory", at_least=0, metavar="MB")
    compile: bool = setting(False, "torch.compile each architecture once per process (pays off on long GPU studies; "
                            "on a CPU, torch 2.14's compiler gets rkd's gradients wrong: docs/performance.md)", SPEED)
    channels_last: bool = setting(True, "NHWC memory format for conv models", SPEED)
    cpu_workers: int | None = setting(
        None, "CPU only: worker threads (one intra-op thread each) that split the teacher's batch and share out the "
        "students", SPEED, default_text="the cores; 0: plain intra-op threads", at_least=0, metavar="N")
    fused: bool | None = setting(
        None, "stack the lockstep students that draw no random numbers into one model with one optimiser step "
        "(torch.func.vmap)", SPEED, default_text="on for CUDA with --parallel >= 2; on CPU where it measures faster")

    storage: str | None = setting(None, "Optuna storage URL (e.g. postgresql://user@host/db)", TRACKING,
                                  default_text="$KDSWEEP_STORAGE, else sqlite:///mlruns/optuna.db")
    tracking_uri: str | None = setting(None, "MLflow tracking URI (e.g. http://127.0.0.1:5000)", TRACKING,
                                       default_text="$MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db")

    on_mismatch: str = setting(
        "refuse", "when the study's Optuna trials and MLflow runs disagree at start (a store deleted or replaced): "
        "refuse says what disagrees in one line and stops; repair marks MLflow runs that no trial of this Optuna study "
        "owns (and a parent run of another Optuna study) kdsweep.state=ORPHANED, status KILLED, which the report skips, "
        "and re-creates a run from Optuna's record (params, val/test accuracy; no curves, no checkpoint) for each "
        "complete trial whose run is gone; ignore goes on and says so", INTEGRITY, choices=ON_MISMATCH, in_file=False)


def schema(names: Iterable[str] | None = None) -> list[Field]:
    """The settings' fields, in schema order (only `names`, when given)."""
    want = None if names is None else set(names)
    return [f for f in fields(StudySettings) if want is None or f.name in want]


def names() -> list[str]:
    """Every setting's name: the API's keywords and the study and sweep flags (as --name-with-dashes)."""
    return [f.name for f in schema()]


def file_keys() -> set[str]:
    """The keys a study file's [defaults] may set."""
    return {f.name for f in schema() if f.metadata["in_file"]}


def flag(name: str) -> str:
    """The command-line flag of a setting."""
    return "--" + name.replace("_", "-")


@cache
def _hints() -> dict[str, Any]:
    # resolved once: get_type_hints evaluates every annotation of the class on each call, and the parser asks
    # once per flag (about 100 ms of every command's start)
    return get_type_hints(StudySettings)


def kind(name: str) -> type | None:
    """The setting's type without its None (int, float, str or bool), from its annotation."""
    hint = _hints()[name]
    kinds = [t for t in (get_args(hint) or (hint,)) if t is not type(None)]
    return kinds[0] if len(kinds) == 1 else None


def default_text(f: Field) -> str | None:
    """What a setting's help says its default is: the declared default, or the words for one decided later."""
    if f.metadata["default_text"] is not None:
        return f.metadata["default_text"]
    if f.default is MISSING or f.default is None:
        return None
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return f"{f.default:g}" if isinstance(f.default, float) else str(f.default)


def help_text(f: Field, default: str | None = None) -> str:
    """The setting's help with its default appended: `default` when given (a command's own), else the schema's."""
    said = default if default is not None else default_text(f)
    return f.metadata["help"] + (f" (default: {said})" if said else "")


def _bound_problem(meta: dict, value: Any) -> str | None:
    """How `value` breaks the setting's bounds, in words, or None."""
    low, above, below = meta["at_least"], meta["above"], meta["below"]
    if above is not None and below is not None and not above < value < below:
        return f"must be in ({above:g}, {below:g})"
    if above is not None and below is None and not value > above:
        return f"must be greater than {above:g}"
    if low is not None and not value >= low:
        return f"must be at least {low:g}"
    return None


def check(settings: Any) -> None:
    """Every setting given (not None) within its choices and bounds, or a one-line UserError naming its flag."""
    for f in schema():
        value = getattr(settings, f.name)
        if value is None:
            continue
        choices = f.metadata["choices"]
        if choices is not None and value not in choices:
            what = f.name if "_" not in f.name else flag(f.name)
            raise UserError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")
        problem = _bound_problem(f.metadata, value)
        if problem:
            raise UserError(f"{flag(f.name)} {problem}, got {value}")


def in_group(group: str) -> list[str]:
    """The settings of one flag group, in schema order."""
    return [f.name for f in schema() if f.metadata["group"] == group]
