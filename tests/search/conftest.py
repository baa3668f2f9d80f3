"""Fixtures for the distributed-search tests: a throwaway PostgreSQL on loopback, a trained tiny teacher,
and the environment every worker process gets (shared teacher cache, one torch thread, fast heartbeats)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# Small enough for CI on two cores, big enough that every stage of a trial runs.
TINY = ["--model", "resnet20", "--dataset", "fashion-mnist", "--budget-mflops", "25",
        "--max-train-images", "256", "--max-eval-images", "128", "--teacher-steps", "5",
        "--finetune-steps", "2", "--batch-size", "32"]
HEARTBEAT_SECONDS, GRACE_SECONDS = 1, 5


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: starts worker processes, PostgreSQL or Ray (still runs by default)")


@pytest.fixture(scope="session")
def tiny_args() -> list[str]:
    """The search options every distributed test uses (the teacher they share is trained for these)."""
    return list(TINY)


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$GKPD_CACHE for the session: the tiny teacher is trained here once, before any worker starts."""
    cache = tmp_path_factory.mktemp("gkpd-cache")
    env = {**os.environ, "GKPD_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    # The same Prepared the workers build; a missing dataset is the only reason to skip.
    code = ("import sys; from search.cli import parse_args, config_from_args; from search.run import Prepared; "
            "Prepared(config_from_args(parse_args(sys.argv[1:])))")
    done = subprocess.run([sys.executable, "-c", code, *TINY, "--out", str(cache / "warmup")], check=False,
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        if "dataset-fashion-mnist" in done.stderr:
            pytest.skip("Fashion-MNIST not found: apt-get install dataset-fashion-mnist")
        raise RuntimeError(f"training the tiny teacher failed:\n{done.stderr[-3000:]}")
    return cache


@pytest.fixture
def worker_env(teacher_cache: Path) -> dict[str, str]:
    """The environment of a worker process: shared teacher cache, 1 torch thread, heartbeats 1 s / grace 5 s."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GKPD_WORKER", "RAY_ADDRESS"))}
    env.update({
        "GKPD_CACHE": str(teacher_cache), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "GKPD_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS), "GKPD_GRACE_SECONDS": str(GRACE_SECONDS),
        "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1",
    })
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A private PostgreSQL cluster on 127.0.0.1 and a free port, in a temporary directory; removed at the end.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` user (``runuser``).
    Skips only when no PostgreSQL binaries are installed (``apt-get install postgresql``).
    """
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl): apt-get install postgresql")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="gkpd-pg-"))
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", _free_port()
    log = root / "server.log"

    def run(*args: str) -> None:
        done = subprocess.run([*as_user, *args], check=False, capture_output=True, text=True, timeout=120, cwd=root)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout}{done.stderr}"
                               + (log.read_text() if log.exists() else ""))

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    # TCP on loopback only; the Unix socket in our own directory, not the system's /var/run/postgresql.
    options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=100"
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
    try:
        # The README's spelling: a bare postgresql:// URL, whatever driver SQLAlchemy would default to.
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       check=False, capture_output=True, timeout=120, cwd=root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    import psycopg2

    name = f"gkpd_{uuid.uuid4().hex[:10]}"
    deadline = time.monotonic() + 30
    while True:
        try:
            connection = psycopg2.connect(f"{postgres_server}/postgres")
            break
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    connection.close()
    return f"{postgres_server}/{name}"


@pytest.fixture
def local_ray_env(worker_env: dict[str, str]) -> dict[str, str]:
    """A worker environment for ``--backend ray`` on a local Ray bound to 127.0.0.1 (see search.ray_backend)."""
    pytest.importorskip("ray.tune", reason="Ray Tune is not installed: pip install 'ray[tune]'")
    from search.ray_backend import LOCAL_RAY_ENV

    return {**worker_env, **LOCAL_RAY_ENV}


@pytest.fixture(autouse=True)
def _no_latency(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trials skip the latency measurement (seconds each) unless a test turns it on (tests/search/test_latency.py)."""
    monkeypatch.setenv("GKPD_LATENCY", "0")
