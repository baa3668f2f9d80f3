"""Optuna storages: open one by URL (with heartbeats), pick the installed PostgreSQL driver, hide passwords."""

from __future__ import annotations

import importlib.util
import os
import random
import time
from pathlib import Path
from typing import Any

import optuna

__all__ = [
    "open_storage", "driver_url", "redact", "without_password", "sqlite_path", "is_local_file",
    "HEARTBEAT_SECONDS", "GRACE_SECONDS",
]

# A worker records a heartbeat every HEARTBEAT_SECONDS; a RUNNING trial silent for GRACE_SECONDS is failed
# (and re-queued once). $GKPD_HEARTBEAT_SECONDS / $GKPD_GRACE_SECONDS override them (tests use 1 s / 5 s).
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120
# How long an SQLite writer waits for another process's lock before "database is locked" (pysqlite: 5 s).
SQLITE_TIMEOUT_SECONDS = 60
STORAGE_ATTEMPTS = 5
# SQLAlchemy's module for each PostgreSQL driver we accept; the first one installed serves a bare URL.
POSTGRES_DRIVERS = (("psycopg2", "psycopg2"), ("psycopg", "psycopg"))


def _url(url: str) -> Any:
    """SQLAlchemy's parsed URL, or None for what is not one (``journal:PATH``, garbage)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        return None


def redact(url: str) -> str:
    """``url`` with its password shown as ``***`` (for errors and logs)."""
    parsed = _url(url)
    if parsed is None or parsed.password is None:
        return url
    return parsed.render_as_string(hide_password=True)


def without_password(url: str) -> str:
    """``url`` with no password at all (for files): libpq then reads ``~/.pgpass`` or ``$PGPASSWORD``."""
    parsed = _url(url)
    if parsed is None or parsed.password is None:
        return url
    return parsed._replace(password=None).render_as_string(hide_password=False)


def driver_url(url: str) -> str:
    """A bare ``postgresql://`` (or ``postgres://``) URL spelled with a driver that is installed.

    SQLAlchemy's default driver for ``postgresql://`` is psycopg2 before 2.1 and psycopg 3 from 2.1 on, so
    the same URL fails on one version or the other depending on which driver the user installed.
    """
    parsed = _url(url)
    if parsed is None or parsed.drivername not in ("postgresql", "postgres"):
        return url
    for module, driver in POSTGRES_DRIVERS:
        if importlib.util.find_spec(module) is not None:
            return parsed.set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)
    raise ValueError(f"--storage {redact(url)}: no PostgreSQL driver is installed; "
                     "pip install 'gkpd-search[postgres]' (psycopg2)")


def sqlite_path(url: str) -> Path | None:
    """The file of an ``sqlite:///PATH`` URL, else None."""
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def is_local_file(url: str) -> bool:
    """True for storages that are a file on this machine (SQLite, Optuna's journal file)."""
    return url.startswith(("sqlite:", "journal:"))


# What the loser of a race to create a new database's tables is told, on PostgreSQL and on SQLite (whose
# Alembic version row is unique).
CREATE_RACES = ("already exists", "duplicate key", "unique constraint failed")


def open_storage(url: str, *, create: bool = True) -> optuna.storages.BaseStorage:
    """An Optuna storage with heartbeats, so a killed worker's trial is failed instead of RUNNING forever.

    ``create=False``: an SQLite or journal file that does not exist is an error, not a new empty storage.
    """
    local = sqlite_path(url) or (Path(url.removeprefix("journal:")) if url.startswith("journal:") else None)
    if not create and local is not None and not local.is_file():
        raise ValueError(f"storage {url}: no such file on this machine ({os.uname().nodename})")
    if url.startswith("journal:"):
        backend = optuna.storages.journal.JournalFileBackend(url.removeprefix("journal:"))
        return optuna.storages.JournalStorage(backend)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite:"):
        # Several worker processes (--workers N) share one SQLite file; wait for a lock instead of failing.
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_SECONDS}
    heartbeat = _env_seconds("GKPD_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS)
    grace = _env_seconds("GKPD_GRACE_SECONDS", GRACE_SECONDS)
    connect = driver_url(url)
    for attempt in range(1, STORAGE_ATTEMPTS + 1):
        try:
            storage = optuna.storages.RDBStorage(
                connect,
                heartbeat_interval=heartbeat,
                grace_period=grace,
                # A trial whose worker died is failed after the grace period and re-queued once.
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
                engine_kwargs=engine_kwargs,
            )
            if url.startswith("sqlite:"):
                _lock_sqlite_transactions(storage.engine)
            return storage
        except Exception as err:  # sqlalchemy raises many types here: bad scheme, no driver, refused connection
            text = str(err).lower()
            if attempt < STORAGE_ATTEMPTS and any(race in text for race in CREATE_RACES):
                # Workers starting together on a new database race to create Optuna's tables (SQLAlchemy's
                # create_all checks, then creates; Alembic stamps its one version row): the loser finds them
                # there on the next try.
                time.sleep(0.2 + random.random())
                continue
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            # Drivers may echo the URL or DSN back; neither spelling of the password may reach the user.
            password = getattr(_url(url), "password", None)
            if password:
                reason = reason.replace(str(password), "***")
            raise ValueError(f"cannot open storage {redact(url)!r}: {reason}") from None
    raise AssertionError("unreachable")


def _lock_sqlite_transactions(engine: Any) -> None:
    """Make every SQLite transaction take the write lock when it begins (``BEGIN IMMEDIATE``).

    pysqlite starts no transaction before a SELECT, so Optuna's "read the WAITING trial, then set it
    RUNNING" is not atomic on SQLite, and two workers can pop the same queued trial (PostgreSQL locks the
    row). This is SQLAlchemy's recipe for pysqlite transactions; worker transactions are short, and
    writers wait up to SQLITE_TIMEOUT_SECONDS for each other.
    """
    import sqlalchemy

    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_pysqlite_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while the storage set itself up predate the listeners


def _env_seconds(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"${name} must be a whole number of seconds >= 1, got {value!r}")
    return int(value)
