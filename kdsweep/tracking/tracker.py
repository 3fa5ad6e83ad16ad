"""MLflow bookkeeping, through the explicit client API only.

No fluent `mlflow.start_run()`: its run stack is thread-local, so nested runs
silently become top-level runs under Optuna's threads. Every run here is
created with its parent's id in `mlflow.parentRunId`, which is thread-safe
and works against a remote tracking server as well as SQLite.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path
from typing import Any, Mapping

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a teacher fetched is one line, not a bar

import logging  # noqa: E402

from kdsweep.common import failures
from kdsweep.common.errors import UserError
from kdsweep.common.sqlite_stores import use_write_ahead_log
from kdsweep.common.uris import absolute_sqlite, redact, scrub
from kdsweep.tracking import new_store
from kdsweep.tracking.notes import ui_tags
from kdsweep.tracking.vocabulary import PARENT_TAG, RUN_FINISHED

DEFAULT_DIR = Path("mlruns")
LOG_BATCH_METRICS = 1000  # MLflow's limit per log_batch call


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI (MLflow's own variable: a URL with a password stays off the command line), else the
    SQLite store in ./mlruns."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return absolute_sqlite(os.environ["MLFLOW_TRACKING_URI"])
    return absolute_sqlite(f"sqlite:///{(DEFAULT_DIR / 'mlflow.db').as_posix()}")


def quiet() -> None:
    """MLflow and alembic log every schema migration at INFO: keep the terminal for our output."""
    for name in ("mlflow", "alembic", "alembic.runtime.migration", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # It logs a traceback for every failed SQL statement before raising it (a full disk: dozens of lines);
    # the exception itself still reaches the CLI, which says what it means (kdsweep.failures).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def make_store_dir(path: Path, flag: str) -> None:
    """Create the directory of a SQLite store; a directory we may not write is a one-line error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if isinstance(e, PermissionError) or e.errno == errno.EROFS:
            raise UserError(f"permission problem: cannot create the store directory {path} ({e.strerror}): "
                            f"run kdsweep in a directory you may write, or pass {flag}") from None
        raise UserError(failures.explain(e) or f"cannot create the store directory {path}: {e}") from None


# Probing an HTTP tracking server that is not there: MLflow's defaults (7 retries, backoff factor 2, 120 s timeout)
# take about 4 minutes to give up. The first request gets a few seconds; later ones keep MLflow's patience.
PROBE_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


@contextlib.contextmanager
def quick_http():
    """MLflow's HTTP retry settings lowered for one probe, unless the user set them (MLflow reads them per request)."""
    saved = {k: os.environ.get(k) for k in PROBE_HTTP}
    for k, v in PROBE_HTTP.items():
        if saved[k] is None:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


def _unreachable(e: Exception) -> str | None:
    """Why an HTTP tracking server did not answer, in a few words; None if it did answer (with an error)."""
    text = str(e)
    for marker, why in (("refused", "connection refused"), ("timed out", "timed out"),
                        ("Name or service not known", "unknown host"), ("nodename nor servname", "unknown host"),
                        ("Max retries exceeded", "no connection")):
        if marker in text:
            return why
    return None


def add_missing_tags(client: Any, exp: Any, tags: Mapping[str, str]) -> None:
    """Set those of `tags` that the experiment `exp` lacks; a value it has (perhaps the user's) stays."""
    for k, v in tags.items():
        if k not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, k, v)


def _quote(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


class Tracker:
    def __init__(self, uri: str | None):
        from mlflow.tracking import MlflowClient

        self.uri = absolute_sqlite(uri or default_tracking_uri())
        started, new = time.perf_counter(), False
        self.seeded: str | None = None  # a new SQLite store: "copied" or "made" (new_store.seed)
        if self.uri.startswith("sqlite:///"):
            db = Path(self.uri[len("sqlite:///"):])
            make_store_dir(db.parent, "--tracking-uri")
            new = not db.exists()
            use_write_ahead_log()
        elif "://" not in self.uri and not self.uri.startswith("databricks"):
            raise UserError(f"tracking URI {self.uri!r} is not a URL (expected e.g. sqlite:///mlruns/mlflow.db or http://127.0.0.1:5000)")
        failures.register("MLflow", self.uri)
        quiet()
        lock = None
        try:
            if self.uri.startswith("sqlite:///"):
                # MLflow's SQL store takes 0.2-0.6 s to import: outside the lock, or a command's workers import it in turn.
                import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

                from kdsweep.common.locks import StudyLock

                # Workers starting together on one fresh SQLite store would race through its migrations.
                lock = StudyLock(self.uri, "tracking-init")
            with lock or contextlib.nullcontext(), quick_http():
                self.seeded = new_store.seed(db) if new else None
                self.client = MlflowClient(tracking_uri=self.uri)
                self.client.search_experiments(max_results=1)
        except Exception as e:
            explained = failures.explain(e)
            if explained:
                raise UserError(scrub(explained, self.uri)) from None
            unreachable = _unreachable(e) if self.uri.startswith(("http://", "https://")) else None
            if unreachable:
                raise UserError(f"cannot reach the MLflow tracking server {redact(self.uri)} ({unreachable}): is it running? "
                                f"(`mlflow server`), or drop --tracking-uri for the local store") from None
            msg = scrub(failures.first_line(e), self.uri)
            raise UserError(f"cannot open MLflow tracking store {redact(self.uri)}: {msg}") from None
        finally:
            if lock is not None:
                lock.close()
        quiet()
        # A new SQLite store: copied from kdsweep's cache of MLflow's empty schema (new_store.py), or, the first time
        # for this MLflow version, made by its schema migrations.
        self.made_in = time.perf_counter() - started if new else None

    def _artifact_root(self, name: str) -> str | None:
        # For a SQLite store keep artifacts next to the database, not in whatever the cwd is.
        if self.uri.startswith("sqlite:///"):
            db = Path(self.uri[len("sqlite:///"):]).resolve()
            slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
            return (db.parent / "artifacts" / slug).as_uri()
        return None

    def experiment(self, name: str, tags: dict[str, str] | None = None) -> str:
        """The experiment's id, created (with `tags`) if missing; an existing one gains the tags it lacks.
        Either way it carries the MLflow UI's defaults (notes.ui_tags) where it lacks them."""
        tags = tags or {}
        defaults = ui_tags(name, int(time.time() * 1000))
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            for k, v in tags.items():
                if exp.tags.get(k) != v:
                    self.client.set_experiment_tag(exp.experiment_id, k, v)
            add_missing_tags(self.client, exp, defaults)
            return exp.experiment_id
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(name, artifact_location=self._artifact_root(name),
                                                 tags={**defaults, **tags})
        except MlflowException as e:
            # Another worker created it between our lookup and our create.
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id

    def find_run(self, experiment_id: str, tags: Mapping[str, str]) -> str | None:
        runs = self.find_runs(experiment_id, tags, max_results=1)
        return runs[0].info.run_id if runs else None

    def find_runs(self, experiment_id: str, tags: Mapping[str, Any], statuses: tuple[str, ...] = (),
                  max_results: int = 100_000) -> list:
        """Runs carrying all `tags` (and one of `statuses`, if given), oldest first."""
        flt = " and ".join(f"tags.`{k}` = '{_quote(v)}'" for k, v in tags.items())
        runs = []
        for status in statuses or (None,):
            f = flt + (f" and attributes.status = '{status}'" if status else "")
            found, token = [], None
            while True:  # page through: a search returns at most 1000 runs at a time
                page = self.client.search_runs([experiment_id], filter_string=f, max_results=min(max_results - len(found), 1000),
                                               order_by=["attributes.start_time ASC"], page_token=token)
                found += page
                token = page.token
                if not token or len(found) >= max_results:
                    break
            runs += found
        return sorted(runs, key=lambda r: r.info.start_time or 0)

    def close(self, run_id: str, status: str, tags: Mapping[str, Any]) -> None:
        """Tag a run and set its end status, whatever it was (used to close runs of dead workers)."""
        self.log(run_id, tags=tags)
        self.client.set_terminated(run_id, status=status)

    def start(self, experiment_id: str, name: str, tags: Mapping[str, Any], parent: str | None = None) -> str:
        tags = {k: str(v) for k, v in tags.items()}
        if parent:
            tags[PARENT_TAG] = parent
        return self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def log(self, run_id: str, metrics: Mapping[str, float] = (), params: Mapping[str, Any] = (), tags: Mapping[str, Any] = (), step: int = 0) -> None:
        """One round trip for everything: a log_batch per epoch, not a call per metric."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, step) for k, v in dict(metrics).items()],
            params=[Param(k, str(v)) for k, v in dict(params).items()],
            tags=[RunTag(k, str(v)) for k, v in dict(tags).items()],
        )

    def log_steps(self, run_id: str, rows: list[tuple[int, Mapping[str, float]]]) -> None:
        """Many steps' metrics (epoch, {name: value}) in as few round trips as MLflow allows (1000 metrics each)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for step, values in rows for k, v in values.items()]
        for i in range(0, len(metrics), LOG_BATCH_METRICS):
            self.client.log_batch(run_id, metrics=metrics[i : i + LOG_BATCH_METRICS])

    def end(self, run_id: str, status: str = RUN_FINISHED) -> None:
        self.client.set_terminated(run_id, status=status)


class Curves:
    """A run's per-epoch metrics on their way to MLflow: sent at most every `every` seconds, the rest with the run's end.

    One write per epoch costs a short trial more than its training does (docs/performance.md); one write
    at its end keeps nothing from the UI that it would show, and a long run's curves still grow as it trains.
    """

    def __init__(self, tracker: Tracker, run_id: str, every: float = 15.0):
        self.tracker, self.run_id, self.every = tracker, run_id, every
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.sent_at = time.monotonic()

    def add(self, step: int, metrics: Mapping[str, float]) -> None:
        self.rows.append((step, dict(metrics)))
        if time.monotonic() - self.sent_at >= self.every:
            self.tracker.log_steps(self.run_id, self.take())

    def take(self) -> list[tuple[int, dict[str, float]]]:
        """The rows not sent yet (for the run's end to write), and the clock restarted."""
        rows, self.rows = self.rows, []
        self.sent_at = time.monotonic()
        return rows
