"""Teachers: trained once per (dataset, arch, seed, epochs, data size), cached, reused by every study.

Integrity:
  * the file carries the SHA-256 of its weights, checked on load: a damaged
    cache file is moved aside and retrained, a damaged --teacher-checkpoint
    is refused;
  * workers starting together on a cold cache train it once: the first takes
    a lock beside the file (`<file>.lock`), the others wait and load its file;
  * a teacher run left RUNNING by a killed process is closed (KILLED) by the
    next start on that machine: each run names its owner process in a tag.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import torch

from kdsweep.common.atomic import path_component
from kdsweep.common.bars import tqdm
from kdsweep.common.digests import model_digest
from kdsweep.common.errors import UserError
from kdsweep.common.processes import Owner, heartbeat_settings
from kdsweep.data import inputs
from kdsweep.data.device_data import DeviceData
from kdsweep.data.dispatch import get_dataset
from kdsweep.methods.registry import get_method
from kdsweep.models.factory import build_model
from kdsweep.models.zoo import Net, count_params
from kdsweep.tracking.cleanup import owner_tags, run_owner
from kdsweep.tracking.tracker import Tracker
from kdsweep.tracking.vocabulary import REASON_TAG, RUN_FAILED, RUN_KILLED, RUN_RUNNING
from kdsweep.training import checkpoint
from kdsweep.training.loop import EpochStats, NonFiniteLoss, Schedule, evaluate, train_student

TEACHERS_EXPERIMENT = "teachers"


def cache_dir() -> Path:
    """$KDSWEEP_CACHE, else ~/.cache/kdsweep."""
    env = os.environ.get("KDSWEEP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kdsweep"


def cache_path(dataset: str, arch: str, seed: int, epochs: int, data_size: int | None, val_fraction: float,
               preprocess: str | None = None) -> Path:
    size = f"-n{data_size}" if data_size else ""
    val = "" if val_fraction == 0.1 else f"-v{val_fraction:g}"
    inputs_tag = f"-{inputs.parse(preprocess).tag}" if inputs.parse(preprocess).tag else ""  # trained on other inputs
    # A registered model may be named anything, '../x' too: the name must not lead the file out of the cache.
    return cache_dir() / "teachers" / path_component(f"{dataset}-{arch}-s{seed}-e{epochs}{size}{val}{inputs_tag}.pt")


class EpochLines:
    """Progress where no bar can show (output in a file or a pipe): one line per epoch, at most one every
    `every` seconds, and always the first and the last, so a long training is never a silence."""

    def __init__(self, label: str, total: int, say=print, every: float = 30.0):
        self.label, self.total, self.say, self.every = label, total, say, every
        self.start = self.last = time.monotonic()

    def __call__(self, stats: EpochStats) -> None:
        now, epoch = time.monotonic(), stats.epoch + 1
        if epoch in (1, self.total) or now - self.last >= self.every:
            self.say(f"{self.label}: epoch {epoch}/{self.total}, val_acc {stats.val_acc:.4f}, {now - self.start:.0f}s")
            self.last = now


def train_teacher(dataset: str, arch: str, seed: int, epochs: int, data: DeviceData, tracker: Tracker, path: Path,
                  batch_size: int = 128, lr: float | None = None, say=print) -> Path:
    """Train `arch` with cross-entropy, keep the best-val epoch, save it to `path`, log a `teachers` run.

    The optimiser, its weight decay and (unless `lr` is given) its learning rate are the dataset's recipe.
    """
    spec = get_dataset(dataset)
    torch.manual_seed(seed)
    model = build_model(arch, data.in_shape, data.num_classes)
    ce = get_method("ce")({}, model.shapes(data.in_shape), None, epochs)
    schedule = Schedule(epochs=epochs, batch_size=batch_size, lr=spec.teacher_lr if lr is None else lr,
                        weight_decay=spec.weight_decay, optimizer=spec.optimizer)
    exp = tracker.experiment(TEACHERS_EXPERIMENT)
    params = {"dataset": dataset, "arch": arch, "seed": seed, "epochs": epochs, "params": count_params(model),
              "data_size": data.n_train, "preprocess": data.preprocess, **{k: v for k, v in vars(schedule).items() if k != "epochs"}}
    close_dead_teacher_runs(tracker)
    run = tracker.start(exp, path.stem, {"kdsweep.role": "teacher", "kdsweep.dataset": dataset,
                                         **owner_tags()})
    try:
        tracker.log(run, params=params)
        bar = tqdm(total=epochs, desc=f"teacher {arch}", unit="epoch", leave=False, disable=None)
        lines = None if not bar.disable else EpochLines(f"teacher {arch}", epochs, say)  # tqdm shows on a terminal only

        def on_epoch(stats: EpochStats) -> None:
            tracker.log(run, stats.metrics(), step=stats.epoch)
            if lines:
                lines(stats)

        result = train_student(model, ce, None, data, schedule, progress=lambda e: bar.update(1), on_epoch=on_epoch)
        bar.close()
        model.load_state_dict(result.state["student"])
        test_loss, test_acc = evaluate(model, data, "test")
        meta = {"dataset": dataset, "seed": seed, "epochs": epochs, "best_epoch": result.best_epoch,
                "val_acc": result.best_val_acc, "test_acc": test_acc, "preprocess": data.preprocess,
                "trained": time.strftime("%Y-%m-%d %H:%M:%S")}
        checkpoint.save(path, arch, data.in_shape, data.num_classes, {"student": result.state["student"]}, meta,
                        sha256=model_digest(model))
        tracker.log(run, {"best_val_acc": result.best_val_acc, "test_acc": test_acc, "test_loss": test_loss,
                          "best_epoch": result.best_epoch}, tags={"kdsweep.checkpoint": str(path)})
        tracker.client.log_artifact(run, str(path), "checkpoint")
        tracker.end(run)
    except BaseException as e:
        with contextlib.suppress(Exception):  # best effort: never mask why training stopped
            if isinstance(e, KeyboardInterrupt):
                tracker.close(run, RUN_KILLED, {REASON_TAG: "interrupted"})
            else:
                tracker.close(run, RUN_FAILED, {REASON_TAG: f"{type(e).__name__}: {str(e)[:200]}"})
        if isinstance(e, NonFiniteLoss):  # the user's data or model, not a bug: one line
            raise UserError(f"the teacher {arch} diverged while training on {dataset} ({e}): look for extreme values "
                            f"in the data or the model's outputs, or give a trained teacher with --teacher-checkpoint") from None
        raise
    return path


def close_dead_teacher_runs(tracker: Tracker) -> int:
    """Close (KILLED, with a reason) the RUNNING teacher runs whose owner process on this machine is gone.

    Runs of live processes, of other machines (whose processes cannot be seen
    from here) and of older kdsweep (no owner tag) are left alone.
    """
    exp = tracker.client.get_experiment_by_name(TEACHERS_EXPERIMENT)
    if exp is None:
        return 0
    closed = 0
    for run in tracker.find_runs(exp.experiment_id, {"kdsweep.role": "teacher"}, statuses=(RUN_RUNNING,)):
        owner = run_owner(run)
        if owner is not None and owner.alive() is False:
            tracker.close(run.info.run_id, RUN_KILLED, {REASON_TAG: f"its process {owner} is gone (killed or crashed)"})
            closed += 1
    return closed


def _holder_file(lock: Path) -> Path:
    return lock.with_name(lock.name + ".holder")


def _write_holder(lock: Path, since: float) -> None:
    """Who holds the lock and when it last beat, beside it (replaced whole: a reader never sees half)."""
    doc = json.dumps({"owner": Owner.me().as_attr(), "since": since, "beat": time.time()})
    fd, tmp = tempfile.mkstemp(dir=lock.parent, prefix=f".{lock.name}.{os.getpid()}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(doc)
    os.replace(tmp, _holder_file(lock))


@contextlib.contextmanager
def _beating(lock: Path) -> Iterator[None]:
    """While the lock is held, beat beside it every heartbeat interval, so a waiter can tell a frozen holder."""
    interval, _ = heartbeat_settings()
    since, stop = time.time(), threading.Event()
    with contextlib.suppress(OSError):  # the first beat before the holder's work, not when the thread gets its turn:
        _write_holder(lock, since)  # a holder frozen at once must still be named

    def beat() -> None:
        while not stop.wait(interval):
            with contextlib.suppress(OSError):  # a missed beat is no failure: the grace period allows several
                _write_holder(lock, since)

    thread = threading.Thread(target=beat, name="kdsweep-teacher-lock-beat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        _holder_file(lock).unlink(missing_ok=True)  # still under the lock: no waiter reads a stale holder as ours


def _wait_for(fd: int, lock: Path, path: Path, say) -> None:
    """Wait for the lock's holder; refuse in one line when its beat is older than the grace period (a process
    stopped with Ctrl-Z or SIGSTOP holds an flock for ever, and the waiter waited for ever)."""
    import fcntl

    interval, grace = heartbeat_settings()
    said = False
    while True:
        try:
            holder = json.loads(_holder_file(lock).read_text())
        except (OSError, ValueError):
            holder = None  # between two holders, or an older kdsweep that writes none: wait as it always did
        owner = Owner.from_attr(holder.get("owner")) if holder else None
        if not said:
            who = (f" ({owner}, holding it since {time.strftime('%H:%M:%S', time.localtime(holder['since']))})"
                   if owner else "")
            say(f"Another process{who} is training or checking teacher {path.name}; waiting for it (lock {lock}).")
            said = True
        if owner and time.time() - float(holder["beat"]) > grace:
            raise UserError(f"teacher {path.name} is locked by {owner}, which has not beaten for "
                            f"{time.time() - float(holder['beat']):.0f}s (stopped or hung?): resume or end that process, "
                            f"then run again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(min(1.0, interval))


@contextlib.contextmanager
def cache_lock(path: Path, say=print):
    """Hold `<path>.lock` (flock): one process at a time trains, checks or replaces the cached teacher `path`."""
    import fcntl

    lock = path.with_name(path.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides who else may share the cache
    except OSError as e:
        if path.is_file():  # a read-only shared cache: nothing will be written, so no lock is needed
            yield
            return
        why = "permission denied" if isinstance(e, PermissionError) else (e.strerror or type(e).__name__)
        raise UserError(f"cannot write to the teacher cache {lock.parent}: {why} (set $KDSWEEP_CACHE to a writable "
                        f"directory, or pass --teacher-checkpoint)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _wait_for(fd, lock, path, say)
        with _beating(lock):
            yield
    finally:
        os.close(fd)  # releases the lock


def _load(cfg, data: DeviceData, path: Path) -> tuple[Net, dict]:
    return checkpoint.load_model(path, cfg.teacher, data.in_shape, data.num_classes,
                                 getattr(cfg, "teacher_feature", None), getattr(cfg, "teacher_embedding", None))


def _cached_teacher(cfg, data: DeviceData, tracker: Tracker, path: Path, say) -> tuple[Net, dict]:
    """The cached teacher, trained first if missing or damaged; under the cache lock, so it is trained once."""
    with cache_lock(path, say):
        if path.is_file():  # checked under the lock: another worker may just have written it
            try:
                model, payload = _load(cfg, data, path)
                say(_provenance(path, payload.get("meta", {})))
                return model, payload
            except checkpoint.Damaged as e:
                aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(path, aside)
                say(f"{e}; moved it to {aside.name} and training the teacher again")
        else:
            say(f"No cached teacher {cfg.teacher} for {cfg.dataset} (seed {cfg.seed}, {cfg.teacher_epochs} epochs): "
                f"training one now -> {path}")
        train_teacher(cfg.dataset, cfg.teacher, cfg.seed, cfg.teacher_epochs, data, tracker, path,
                      batch_size=get_dataset(cfg.dataset).batch_size, say=say)
        return _load(cfg, data, path)


def _provenance(path: Path, meta: dict) -> str:
    """Where a cached teacher came from, in one line: the cache is shared by every project of this user."""
    when = meta.get("trained") or time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime))
    score = f", val_acc {meta['val_acc']:.4f}" if isinstance(meta.get("val_acc"), (int, float)) else ""
    return (f"teacher: the cached {path} (trained by kdsweep {when}, {meta.get('epochs', '?')} epochs{score}; the cache "
            f"serves every project of this user: $KDSWEEP_CACHE or --teacher-checkpoint chooses another)")


def get_teacher(cfg, data: DeviceData, tracker: Tracker, say=print) -> tuple[Net, dict]:
    """The study's teacher: --teacher-checkpoint (kdsweep's, or a plain state_dict for cfg.teacher), else the cache,
    else trained now (and said so).

    info: the file's metadata, its path, "sha256" (the weights' digest: the
    study's teacher identity) and "val_acc" measured now on this study's
    validation split (the file's own claim is kept as "stored_val_acc").
    """
    close_dead_teacher_runs(tracker)
    if cfg.teacher_checkpoint:
        path = Path(cfg.teacher_checkpoint)
        model, payload = _load(cfg, data, path)  # damaged: refused (ChecksumMismatch is a UserError)
    else:
        # data.tag: a spec's name and the digest of its images, so a changed folder never meets an old teacher
        path = cache_path(data.tag or cfg.dataset, cfg.teacher, cfg.seed, cfg.teacher_epochs, cfg.data_size, cfg.val_fraction,
                          cfg.preprocess)
        model, payload = _cached_teacher(cfg, data, tracker, path, say)
    if checkpoint.SHA_KEY not in payload and not payload.get("plain"):  # a plain state_dict never carries one
        say(f"note: teacher {path} carries no checksum (written by an older kdsweep): its weights cannot be verified")
    digest = model_digest(model)  # memoised: verified above at no extra cost
    model.to(data.device).eval().requires_grad_(False)
    meta = payload.get("meta", {})
    _, val_acc = evaluate(model, data, "val")
    info = {"path": str(path), **meta, "stored_val_acc": meta.get("val_acc"), "val_acc": val_acc, "sha256": digest,
            "file_sha256": checkpoint.file_sha256(path)}
    return model, info


# A teacher worth distilling covers at least this share of the way from chance to perfect accuracy on the study's
# validation split: 0.28 for 10 classes, 0.4 for 4, 0.6 for 2, 0.21 for 100; a random one scores about chance.
MIN_SKILL = 0.2
# A teacher scoring this much (or 3 standard errors, on a small split) below its checkpoint's own score, or below
# what it scores through another preprocessing, is being fed inputs other than it was trained on.
MAX_DROP = 0.1


def _allowed_drop(acc: float, n_val: int) -> float:
    return max(MAX_DROP, 3 * math.sqrt(acc * (1 - acc) / n_val))


def teacher_problem(val_acc: float, stored_val_acc: float | None, num_classes: int, n_val: int,
                    elsewhere: dict[str, float] | None = None) -> str | None:
    """Why a teacher is not worth distilling from, in words (None: it is): it scores far better through another
    preprocessing (`elsewhere`: {setting: val_acc}), near chance, or far below its checkpoint's own score."""
    best = max((elsewhere or {}).items(), key=lambda kv: kv[1], default=None)
    if best and best[1] > val_acc + _allowed_drop(best[1], n_val):
        return f"scores val_acc {val_acc:.3f}, and {best[1]:.3f} with --preprocess {best[0]}: it was trained on other inputs"
    chance = 1 / num_classes
    noise = 3 * math.sqrt(chance * (1 - chance) / n_val)  # a random teacher's luck on a small validation split
    floor = chance + max(MIN_SKILL * (1 - chance), noise)
    if val_acc < floor:
        return (f"scores val_acc {val_acc:.3f}, near chance ({chance:.3f} for {num_classes} classes; a teacher needs "
                f"{floor:.3f})")
    if isinstance(stored_val_acc, (int, float)) and val_acc < stored_val_acc - _allowed_drop(stored_val_acc, n_val):
        return f"scores val_acc {val_acc:.3f}, far below the {stored_val_acc:.3f} its checkpoint says it scored"
    return None


def _elsewhere(model: Net, data: DeviceData, current: str | None) -> dict[str, float]:
    """The teacher's validation accuracy through the other standard preprocessings (one evaluation pass each)."""
    now = inputs.parse(current).text
    return {how: evaluate(model, data.seen_through(how), "val")[1] for how in (inputs.STANDARDIZE, inputs.NONE)
            if how != now}


def check_teacher(cfg, data: DeviceData, model: Net, info: dict, say=print) -> str | None:
    """Refuse, in one line, a given teacher (--teacher-checkpoint, a module) that scores far better through another
    preprocessing, near chance, or far below its claim on this study's inputs; warn about a weak teacher kdsweep
    trained itself (on these very inputs); with --accept-teacher say so and return why, for the record."""
    given = bool(cfg.teacher_checkpoint)
    elsewhere = _elsewhere(model, data, cfg.preprocess) if given else None
    why = teacher_problem(info["val_acc"], info.get("stored_val_acc"), data.num_classes, len(data.val_y), elsewhere)
    if why is None:
        return None
    who = f"teacher {cfg.teacher} ({info['path']})"
    if cfg.accept_teacher:
        say(f"note: {who} {why}; distilling from it all the same (--accept-teacher, recorded in MLflow)")
        return why
    if not given:
        say(f"warning: {who} {why} after {cfg.teacher_epochs} epochs of kdsweep's training on these inputs: more "
            f"--teacher-epochs make a teacher worth distilling")
        return None
    raise UserError(f"{who} {why} on this study's validation split, whose inputs are preprocessed as {data.preprocess}: "
                    f"give --preprocess as the teacher was trained (none: images in [0, 1]; MEAN/STD: its own "
                    f"statistics), or --accept-teacher to distil from it all the same")
