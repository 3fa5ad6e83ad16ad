"""The study's teacher in the tracking server: every host of a study gets the same teacher, no file copied.

* Published: a teacher run (experiment `teachers`) holds the weights as its artifact
  `checkpoint/<file>`, `teacher.json` beside it (digest, recipe, validation accuracy), and as tags
  the teacher's identity (TEACHER_KEY_TAG: its cache file's name) and its weights' digest
  (TEACHER_SHA_TAG). The teacher run rather than a study's parent run: one teacher serves every
  method's study (twenty studies, one upload), and `kdsweep teacher` trains one with no study at all.
  A run is FINISHED only after its upload, so a FINISHED run always has its weights.
* Fetched: a worker without the study's teacher downloads it into its cache and checks the digest
  before using it; the first teacher published for an identity is the one every host uses.
* Claimed: on PostgreSQL storage only one worker of any host trains a missing teacher, under an
  advisory lock keyed by the identity (locks.WorkLock), which dies with its holder; the next worker
  then takes over and closes the dead holder's run. A SQLite store is one host: the cache's file
  lock (teacher.cache_lock) is enough there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from kdsweep.common import failures
from kdsweep.common.digests import model_digest
from kdsweep.common.errors import UserError
from kdsweep.common.locks import WorkLock, is_postgres
from kdsweep.common.processes import heartbeat_settings
from kdsweep.common.uris import redact, scrub
from kdsweep.tracking.cleanup import owner_tags, run_owner
from kdsweep.tracking.tracker import Tracker
from kdsweep.tracking.vocabulary import (
    REASON_TAG,
    RUN_FAILED,
    RUN_FINISHED,
    RUN_KILLED,
    RUN_RUNNING,
    TEACHER_KEY_TAG,
    TEACHER_SHA_TAG,
)
from kdsweep.training import checkpoint

TEACHERS_EXPERIMENT = "teachers"
CHECKPOINT_DIR = "checkpoint"  # the artifact folder of a teacher run that holds its weights file


def _teacher_runs(tracker: Tracker, tags: dict[str, str], statuses: tuple[str, ...]) -> list:
    exp = tracker.client.get_experiment_by_name(TEACHERS_EXPERIMENT)
    if exp is None:
        return []
    return tracker.find_runs(exp.experiment_id, {"kdsweep.role": "teacher", **tags}, statuses=statuses)


def find_published(tracker: Tracker, key: str | None = None, sha: str | None = None):
    """The first FINISHED teacher run with this digest (or else this identity); None when there is none."""
    runs = _teacher_runs(tracker, {TEACHER_SHA_TAG: sha} if sha else {TEACHER_KEY_TAG: str(key)}, (RUN_FINISHED,))
    return runs[0] if runs else None  # oldest first: the first published is the one all hosts agree on


def upload(tracker: Tracker, run: str, path: Path, digest: str, meta: dict[str, Any]) -> None:
    """The weights file and what it is, as artifacts of the teacher run `run` (still RUNNING: the caller ends it)."""
    tracker.log(run, tags={TEACHER_SHA_TAG: digest})
    tracker.client.log_artifact(run, str(path), CHECKPOINT_DIR)
    tracker.client.log_dict(run, {"sha256": digest, "file": path.name, **meta}, "teacher.json")


def publish(tracker: Tracker, path: Path, digest: str, key: str, say: Callable[[str], None]) -> str | None:
    """Log a teacher this host holds and the tracking server lacks (trained before, elsewhere); its run id.

    A failure is one line and no stop: this host can still run the study, and the others then say
    that they cannot fetch it.
    """
    payload = checkpoint.load(path)
    meta = {k: v for k, v in (payload.get("meta") or {}).items() if isinstance(v, (int, float, str))}
    exp = tracker.experiment(TEACHERS_EXPERIMENT)
    run = tracker.start(exp, path.stem, {"kdsweep.role": "teacher", "kdsweep.dataset": meta.get("dataset", ""),
                                         "kdsweep.origin": "cache", TEACHER_KEY_TAG: key, "kdsweep.checkpoint": str(path),
                                         **owner_tags()})
    try:
        tracker.log(run, {k: meta[k] for k in ("val_acc", "test_acc") if isinstance(meta.get(k), (int, float))},
                    params={"arch": payload.get("arch", ""), **{k: meta[k] for k in ("dataset", "seed", "epochs") if k in meta}})
        upload(tracker, run, path, digest, meta)
        tracker.end(run)
        return run
    except Exception as e:  # noqa: BLE001
        why = scrub(failures.first_line(e), tracker.uri)
        with contextlib.suppress(Exception):
            tracker.close(run, RUN_FAILED, {REASON_TAG: f"upload failed: {why}"})
        say(f"warning: could not publish teacher {digest[:12]} to the tracking server {redact(tracker.uri)} ({why}): "
            f"workers on other hosts cannot fetch it")
        return None


def fetch(tracker: Tracker, run, dest: Path, say: Callable[[str], None]) -> Path:
    """Download teacher run `run`'s weights to `dest` (replaced whole), refusing a file whose digest is not the run's."""
    sha, run_id = run.data.tags.get(TEACHER_SHA_TAG, ""), run.info.run_id
    name = Path(run.data.tags.get("kdsweep.checkpoint", "teacher.pt")).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.fetch-{os.getpid()}-")
    try:
        try:
            got = Path(tracker.client.download_artifacts(run_id, f"{CHECKPOINT_DIR}/{name}", tmp))
        except Exception as e:  # noqa: BLE001 - any failure to get it is the same news to the user
            why = scrub(failures.first_line(e), tracker.uri)
            raise UserError(f"cannot fetch the study's teacher {sha[:12]} (run {run_id}, artifact {CHECKPOINT_DIR}/{name}) "
                            f"from the tracking server {redact(tracker.uri)}: {why}") from None
        model, _ = checkpoint.load_model(got)  # a damaged download is refused here (its stored digest)
        digest = model_digest(model)
        if digest != sha:
            raise UserError(f"the teacher fetched from run {run_id} hashes to {digest[:12]}, not {sha[:12]} as the run "
                            f"records: the tracking server's copy was replaced; not using it")
        os.replace(got, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"Fetched teacher {sha[:12]} from the tracking server {redact(tracker.uri)} (run {run_id}) -> {dest}")
    return dest


def _take_over(tracker: Tracker, key: str, say: Callable[[str], None]) -> None:
    """Under the claim, a RUNNING teacher run of `key` is a holder's that died (its lock went with it): close it."""
    for run in _teacher_runs(tracker, {TEACHER_KEY_TAG: key}, (RUN_RUNNING,)):
        owner = run_owner(run)
        if owner is not None and owner.alive():
            continue  # `kdsweep teacher` on this host, which takes no claim: still working
        who = str(owner) if owner else "a worker"
        tracker.close(run.info.run_id, RUN_KILLED, {REASON_TAG: f"{who} stopped while training it (its claim was released)"})
        say(f"Worker {who} stopped while training teacher {key} (run {run.info.run_id} closed as KILLED); "
            f"this worker takes over.")


def _trainer(tracker: Tracker, key: str) -> str:
    runs = _teacher_runs(tracker, {TEACHER_KEY_TAG: key}, (RUN_RUNNING,))
    owner = run_owner(runs[-1]) if runs else None
    return f" ({owner})" if owner else ""


@contextlib.contextmanager
def claim(tracker: Tracker, storage_url: str | None, key: str, say: Callable[[str], None]) -> Iterator[None]:
    """Hold the cross-host claim on teacher `key` while it is fetched, checked or trained (PostgreSQL storage only)."""
    if not storage_url or not is_postgres(storage_url):
        yield
        return
    interval, grace = heartbeat_settings()
    lock = WorkLock(storage_url, f"teacher:{key}", interval, grace)
    try:
        said = False
        while not lock.try_acquire():
            if not said:
                say(f"Another worker{_trainer(tracker, key)} holds teacher {key} (training or publishing it); "
                    f"waiting for it.")
                said = True
            time.sleep(1.0)
        _take_over(tracker, key, say)
        yield
        if lock.lost:
            say(f"warning: the claim on teacher {key} lapsed while this worker held it (stopped for over {grace}s?): "
                f"another worker may have trained it too")
    finally:
        lock.release()
