"""MLflow bookkeeping, through the explicit client API only.

No fluent `mlflow.start_run()`: its run stack is thread-local, so nested runs
silently become top-level runs under Optuna's threads. Every run here is
created with its parent's id in `mlflow.parentRunId`, which is thread-safe
and works against a remote tracking server as well as SQLite.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import logging  # noqa: E402

from .errors import UserError  # noqa: E402

DEFAULT_DIR = Path("mlruns")
PARENT_TAG = "mlflow.parentRunId"


def absolute_sqlite(uri: str) -> str:
    """sqlite:///relative/path -> sqlite:////absolute/path, resolved against the current directory now.

    MLflow caches one database engine per URI string: a relative URI would keep
    pointing at the first directory's file after a chdir.
    """
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + Path(uri[len(prefix):]).resolve().as_posix()
    return uri


def default_tracking_uri() -> str:
    return absolute_sqlite(f"sqlite:///{(DEFAULT_DIR / 'mlflow.db').as_posix()}")


def quiet() -> None:
    """MLflow and alembic log every schema migration at INFO: keep the terminal for our output."""
    for name in ("mlflow", "alembic", "alembic.runtime.migration", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)


def redact(uri: str) -> str:
    """A URI with any password replaced, safe to print or log."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable uri>"
    if parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    return uri


class Tracker:
    def __init__(self, uri: str | None):
        from mlflow.tracking import MlflowClient

        self.uri = absolute_sqlite(uri or default_tracking_uri())
        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        elif "://" not in self.uri and not self.uri.startswith("databricks"):
            raise UserError(f"tracking URI {self.uri!r} is not a URL (expected e.g. sqlite:///mlruns/mlflow.db or http://127.0.0.1:5000)")
        quiet()
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            self.client.search_experiments(max_results=1)
        except Exception as e:
            raise UserError(f"cannot open MLflow tracking store {redact(self.uri)}: {str(e).splitlines()[0][:200]}") from None
        quiet()

    def _artifact_root(self, name: str) -> str | None:
        # For a SQLite store keep artifacts next to the database, not in whatever the cwd is.
        if self.uri.startswith("sqlite:///"):
            db = Path(self.uri[len("sqlite:///"):]).resolve()
            slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
            return (db.parent / "artifacts" / slug).as_uri()
        return None

    def experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        return self.client.create_experiment(name, artifact_location=self._artifact_root(name))

    def find_run(self, experiment_id: str, tags: Mapping[str, str]) -> str | None:
        flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([experiment_id], filter_string=flt, max_results=1, order_by=["attributes.start_time ASC"])
        return runs[0].info.run_id if runs else None

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

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)
