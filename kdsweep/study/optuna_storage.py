"""Optuna's side of a study: its storage (SQLite or a database server), sampler and pruner.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import optuna

from kdsweep.common import failures
from kdsweep.common.errors import UserError
from kdsweep.common.locks import StudyLock
from kdsweep.common.processes import heartbeat_settings
from kdsweep.common.sqlite_stores import use_write_ahead_log
from kdsweep.common.uris import absolute_sqlite, redact, scrub
from kdsweep.study.config import StudyConfig
from kdsweep.tracking.tracker import DEFAULT_DIR, make_store_dir

STORAGE_ENV = "KDSWEEP_STORAGE"  # a storage URL with a password stays off the command line, where `ps` shows it


def default_storage() -> str:
    if os.environ.get(STORAGE_ENV):
        return absolute_sqlite(os.environ[STORAGE_ENV])
    # Its own SQLite file: Optuna and MLflow must not share one (both run alembic migrations).
    return absolute_sqlite(f"sqlite:///{(DEFAULT_DIR / 'optuna.db').as_posix()}")


def _with_driver(url: str) -> str:
    """PostgreSQL URLs without a driver: SQLAlchemy 2.1 defaults to psycopg (3); fall back to psycopg2 if only it is here."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres") or not sep:
        return url
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return f"postgresql://{rest}"


def open_storage(url: str | None) -> optuna.storages.RDBStorage:
    given = absolute_sqlite(url or default_storage())  # what messages show (redacted)
    url = _with_driver(given)
    engine_kwargs = {}
    if url.startswith("sqlite:///"):
        db = Path(url[len("sqlite:///"):])
        if not db.parent.is_dir():
            if db.parent == DEFAULT_DIR.resolve():
                make_store_dir(db.parent, "--storage")
            else:
                raise UserError(f"storage {url}: directory {db.parent} does not exist")
        # Several workers on one host share the file: wait for its write lock instead of failing after 5 s.
        engine_kwargs = {"connect_args": {"timeout": 60}}
        use_write_ahead_log()
    interval, grace = heartbeat_settings()
    failures.register("Optuna", given)
    lock = None
    try:
        # Workers starting together on a fresh database would race to create Optuna's tables.
        lock = StudyLock(url, "storage-init")
        with lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=interval, grace_period=grace)
    except Exception as e:
        explained = failures.explain(e)
        if explained:
            raise UserError(scrub(explained, given)) from None
        msg = failures.first_line(e)
        raise UserError(f"cannot open Optuna storage {redact(given)}: {scrub(msg, given)}") from None
    finally:
        if lock is not None:
            lock.close()


def make_sampler(cfg: StudyConfig, n_existing: int) -> optuna.samplers.BaseSampler:
    # Offset the seed by the trials already run, so a resumed random/startup phase does not replay them.
    seed = cfg.seed + n_existing
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        # Five full trials set the bar; no trial is judged on its first epoch alone.
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.epochs)
    return optuna.pruners.NopPruner()


def count(study: optuna.Study, state: optuna.trial.TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=(state,)))
