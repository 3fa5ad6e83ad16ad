"""Teachers: trained once per (dataset, arch, seed, epochs, data size), cached, reused by every study.

Integrity:
  * the file carries the SHA-256 of its weights, checked on load: a damaged
    cache file is moved aside and retrained, a damaged --teacher-checkpoint
    is refused;
  * workers starting together on a cold cache train it once: the first takes
    a lock beside the file (`<file>.lock`), the others wait and load its file;
    workers on other hosts (PostgreSQL storage) take a claim across hosts and
    fetch the teacher from the tracking server (teacher_store.py);
  * a teacher run left RUNNING by a killed process is closed (KILLED) by the
    next start on that machine: each run names its owner process in a tag.
"""

from __future__ import annotations

import contextlib
import copy
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
from kdsweep.common.cache import cache_dir
from kdsweep.common.digests import model_digest
from kdsweep.common.errors import UserError
from kdsweep.common.processes import Owner, heartbeat_settings
from kdsweep.common.uris import redact
from kdsweep.data import inputs
from kdsweep.data.device_data import DeviceData
from kdsweep.data.dispatch import get_dataset
from kdsweep.methods.registry import get_method
from kdsweep.models.factory import build_model
from kdsweep.models.zoo import Net, count_params
from kdsweep.tracking.cleanup import owner_tags, run_owner
from kdsweep.tracking.tracker import Tracker
from kdsweep.tracking.vocabulary import (
    REASON_TAG,
    RUN_FAILED,
    RUN_KILLED,
    RUN_RUNNING,
    TEACHER_KEY_TAG,
    TEACHER_SHA_TAG,
)
from kdsweep.training import checkpoint, teacher_store
from kdsweep.training.loop import EpochStats, NonFiniteLoss, Schedule, evaluate, train_student
from kdsweep.training.teacher_store import TEACHERS_EXPERIMENT


def cache_path(dataset: str, arch: str, seed: int, epochs: int, data_size: int | None, val_fraction: float,
               split_seed: int | None = None, control: str | None = None, preprocess: str | None = None) -> Path:
    """The cached teacher's file. `seed` is the teacher's own; `split_seed`, the data split's seed, is named only
    when it differs (a teacher of another seed on the same split), so every older file keeps its name; so are
    inputs other than the default (`preprocess`: a teacher trained on other inputs is another teacher)."""
    size = f"-n{data_size}" if data_size else ""
    val = "" if val_fraction == 0.1 else f"-v{val_fraction:g}"
    split = "" if split_seed is None or split_seed == seed else f"-split{split_seed}"
    what = f"-{control}" if control else f"-e{epochs}"  # an untrained teacher has no epochs
    inputs_tag = f"-{inputs.parse(preprocess).tag}" if inputs.parse(preprocess).tag else ""
    # A registered model may be named anything, '../x' too: the name must not lead the file out of the cache.
    return cache_dir() / "teachers" / path_component(f"{dataset}-{arch}-s{seed}{split}{what}{size}{val}{inputs_tag}.pt")


def study_cache_path(cfg, data: DeviceData) -> Path:
    """The cached teacher of a study's settings (its teacher seed, control and inputs, on its split)."""
    # data.tag: a spec's name and the digest of its images, so a changed folder never meets an old teacher
    return cache_path(data.tag or cfg.dataset, cfg.teacher, cfg.resolved_teacher_seed, cfg.teacher_epochs,
                      cfg.data_size, cfg.val_fraction, cfg.seed, cfg.teacher_control, cfg.preprocess)


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
    if data.stream_seed != seed:  # another teacher seed on the same split: its own batch order too
        data = copy.copy(data)
        data.stream_seed = seed
    ce = get_method("ce")({}, model.shapes(data.in_shape), None, epochs)
    schedule = Schedule(epochs=epochs, batch_size=batch_size, lr=spec.teacher_lr if lr is None else lr,
                        weight_decay=spec.weight_decay, optimizer=spec.optimizer)
    exp = tracker.experiment(TEACHERS_EXPERIMENT)
    params = {"dataset": dataset, "arch": arch, "seed": seed, "epochs": epochs, "params": count_params(model),
              "data_size": data.n_train, "preprocess": data.preprocess, **{k: v for k, v in vars(schedule).items() if k != "epochs"}}
    close_dead_teacher_runs(tracker)
    run = tracker.start(exp, path.stem, {"kdsweep.role": "teacher", "kdsweep.dataset": dataset,
                                         TEACHER_KEY_TAG: path.name, **owner_tags()})
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
        digest = model_digest(model)
        checkpoint.save(path, arch, data.in_shape, data.num_classes, {"student": result.state["student"]}, meta,
                        sha256=digest)
        tracker.log(run, {"best_val_acc": result.best_val_acc, "test_acc": test_acc, "test_loss": test_loss,
                          "best_epoch": result.best_epoch}, tags={"kdsweep.checkpoint": str(path)})
        teacher_store.upload(tracker, run, path, digest, {**meta, "arch": arch})
        tracker.end(run)
        # Its last epoch's line is not what it keeps: the epoch kept, whose val_acc the cache names from now on.
        say(f"teacher {arch} on {dataset}: best epoch {result.best_epoch + 1} of {epochs} (the one kept), "
            f"val_acc={result.best_val_acc:.4f}, test_acc={test_acc:.4f} -> {path}")
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


def _digest_or_aside(cfg, data: DeviceData, path: Path, say) -> str | None:
    """The weight digest of the teacher file at `path`; None when there is none, or it was damaged (moved aside)."""
    if not path.is_file():
        return None
    try:
        return model_digest(_load(cfg, data, path)[0])
    except checkpoint.Damaged as e:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, aside)
        say(f"{e}; moved it to {aside.name}")
        return None


def _held_path(path: Path, sha: str) -> Path:
    """Where the cache keeps a fetched teacher of `path`'s identity when `path` holds another one."""
    return path.with_name(f"{path.stem}.{sha[:12]}{path.suffix}")


def _fetch_or_keep(cfg, data: DeviceData, tracker: Tracker, path: Path, local: str | None, run, say) -> Path:
    """Teacher run `run`'s weights: the file at `path` or beside it when it holds them, else fetched."""
    sha = run.data.tags.get(TEACHER_SHA_TAG, "")
    if local == sha:
        return path
    held = _held_path(path, sha)
    if local is not None:
        if _digest_or_aside(cfg, data, held, say) == sha:
            return held
        say(f"note: {path} holds teacher {local[:12]}, not the study's {sha[:12]}: using the study's, cached as "
            f"{held.name}")
    return teacher_store.fetch(tracker, run, path if local is None else held, say)


def _cached_teacher(cfg, data: DeviceData, tracker: Tracker, path: Path, say, wanted: str | None) -> Path:
    """The file of the study's teacher (digest `wanted` when the study recorded one): cached here, else fetched
    from the tracking server, else (a new identity) trained now and published. Under the cache lock (and the
    claim across hosts), so it is trained once."""
    local = _digest_or_aside(cfg, data, path, say)  # checked under the lock: another worker may just have written it
    run = teacher_store.find_published(tracker, sha=wanted) if wanted else None
    if wanted and run is None:
        if local == wanted:
            return path
        if _digest_or_aside(cfg, data, _held_path(path, wanted), say) == wanted:
            return _held_path(path, wanted)
        raise UserError(f"the study's teacher {wanted[:12]} is neither in this host's cache ({path.parent}) nor in the "
                        f"tracking server {redact(tracker.uri)}: give every worker the study's --tracking-uri (or its "
                        f"teacher file with --teacher-checkpoint)")
    run = run or teacher_store.find_published(tracker, key=path.name)  # the first published for this identity
    if run is not None:
        return _fetch_or_keep(cfg, data, tracker, path, local, run, say)
    if local is not None:
        teacher_store.publish(tracker, path, local, path.name, say)
        return path
    if cfg.teacher_control:
        say(f"No cached {cfg.teacher_control} teacher {cfg.teacher} for {cfg.dataset} (seed "
            f"{cfg.resolved_teacher_seed}): making one now -> {path}")
        return untrained_teacher(cfg.dataset, cfg.teacher, cfg.resolved_teacher_seed, data, tracker, path)
    say(f"No cached teacher {cfg.teacher} for {cfg.dataset} (seed {cfg.resolved_teacher_seed}, {cfg.teacher_epochs} "
        f"epochs): training one now -> {path}")
    train_teacher(cfg.dataset, cfg.teacher, cfg.resolved_teacher_seed, cfg.teacher_epochs, data, tracker, path,
                  batch_size=get_dataset(cfg.dataset).batch_size, say=say)
    return path


def untrained_teacher(dataset: str, arch: str, seed: int, data: DeviceData, tracker: Tracker, path: Path) -> Path:
    """The control teacher: `arch` as initialised by `seed`, never trained; saved and logged as a trained one is
    (a `teachers` run with params epochs=0, control=untrained), so confirm and report find it the same way."""
    torch.manual_seed(seed)
    model = build_model(arch, data.in_shape, data.num_classes).to(data.device)
    _, val_acc = evaluate(model, data, "val")
    test_loss, test_acc = evaluate(model, data, "test")
    meta = {"dataset": dataset, "seed": seed, "epochs": 0, "control": "untrained", "best_epoch": -1,
            "val_acc": val_acc, "test_acc": test_acc}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    checkpoint.save(path, arch, data.in_shape, data.num_classes, {"student": state}, meta, sha256=model_digest(model))
    run = tracker.start(tracker.experiment(TEACHERS_EXPERIMENT), path.stem,
                        {"kdsweep.role": "teacher", "kdsweep.dataset": dataset, TEACHER_KEY_TAG: path.name, **owner_tags()})
    tracker.log(run, {"best_val_acc": val_acc, "test_acc": test_acc, "test_loss": test_loss},
                params={"dataset": dataset, "arch": arch, "seed": seed, "epochs": 0, "control": "untrained",
                        "params": count_params(model), "data_size": data.n_train},
                tags={"kdsweep.checkpoint": str(path)})
    teacher_store.upload(tracker, run, path, model_digest(model), {**meta, "arch": arch})  # other hosts fetch it
    tracker.end(run)
    return path


def _provenance(path: Path, meta: dict) -> str:
    """Where a cached teacher came from, in one line: the cache folder is shared by every project that uses it."""
    when = meta.get("trained") or time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime))
    score = f", val_acc {meta['val_acc']:.4f}" if isinstance(meta.get("val_acc"), (int, float)) else ""
    return (f"teacher: the cached {path} (trained by kdsweep {when}, {meta.get('epochs', '?')} epochs{score}; the cache "
            f"serves every project that uses {path.parent.parent}: $KDSWEEP_CACHE or --teacher-checkpoint chooses another)")


def get_teacher(cfg, data: DeviceData, tracker: Tracker, say=print, storage_url: str | None = None,
                wanted: str | None = None) -> tuple[Net, dict]:
    """The study's teacher: --teacher-checkpoint (kdsweep's, or a plain state_dict for cfg.teacher), else the one
    with digest `wanted` (the study's record) or the first published for its identity, from the cache or fetched
    from the tracking server, else trained now (and said so); `storage_url`: a PostgreSQL one claims across hosts.

    info: the file's metadata, its path, "sha256" (the weights' digest: the
    study's teacher identity) and "val_acc" measured now on this study's
    validation split (the file's own claim is kept as "stored_val_acc").
    """
    close_dead_teacher_runs(tracker)
    if cfg.teacher_checkpoint:
        path = Path(cfg.teacher_checkpoint)
        model, payload = _load(cfg, data, path)  # damaged: refused (ChecksumMismatch is a UserError)
    else:
        path = study_cache_path(cfg, data)  # the teacher's identity (teacher seed, control, data digest...)
        with teacher_store.claim(tracker, storage_url, path.name, say), cache_lock(path, say):
            before = path.stat().st_mtime_ns if path.is_file() else None
            found = _cached_teacher(cfg, data, tracker, path, say, wanted)
            model, payload = _load(cfg, data, found)
        if found == path and before is not None and path.stat().st_mtime_ns == before:  # used as it was: say whose it is
            say(_provenance(path, payload.get("meta", {})))
        path = found
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
                    elsewhere: dict[str, float] | None = None, claimed: float | None = None) -> str | None:
    """Why a teacher is not worth distilling from, in words (None: it is): it scores far better through another
    preprocessing (`elsewhere`: {setting: val_acc}), near chance, or far below its checkpoint's own score or the
    user's (`claimed`, --teacher-val-acc)."""
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
    if claimed is not None and val_acc < claimed - _allowed_drop(claimed, n_val):
        return f"scores val_acc {val_acc:.3f}, far below the {claimed:.3f} you say it scored (--teacher-val-acc)"
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
    if cfg.teacher_control:
        return None  # a control teacher is untrained on purpose: near chance is what it is for
    given = bool(cfg.teacher_checkpoint)
    elsewhere = _elsewhere(model, data, cfg.preprocess) if given else None
    why = teacher_problem(info["val_acc"], info.get("stored_val_acc"), data.num_classes, len(data.val_y), elsewhere,
                          cfg.teacher_val_acc)
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
