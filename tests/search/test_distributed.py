"""One study, many processes: workers on PostgreSQL and SQLite, a worker killed mid-trial, Ctrl-C, failing
trials, and Ray Tune on a local Ray bound to 127.0.0.1. Real processes, real storages, tiny settings."""

from __future__ import annotations

import collections
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import FrozenTrial, TrialState

from search.storage import open_storage
from search.study import FINISHED, checkpoint_file

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]

REPO_ROOT = Path(__file__).resolve().parents[2]
SEARCH = [sys.executable, str(REPO_ROOT / "search.py")]


@pytest.fixture
def search_args(tiny_args: list[str]) -> Callable[..., list[str]]:
    """``search_args(out, study, trials, *extra)``: the tiny search of one test."""
    def args(out: Path, study: str, trials: int, *extra: str) -> list[str]:
        return [*tiny_args, "--out", str(out), "--study-name", study, "--trials", str(trials), *extra]
    return args


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test() -> Iterator[None]:
    yield
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def start(args: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``search.py args`` in its own process group (so a test can Ctrl-C it and its children together).

    As a terminal's foreground job: a program started in the background by a non-interactive shell (``pytest
    &``) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt, so the Ctrl-C tests would
    see a search run to its end. A caught signal is reset to its default by exec, an ignored one is not.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen([*SEARCH, *args], cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                   stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    _STARTED.append(process)
    return process


def finish(process: subprocess.Popen, log: Path, *, timeout: float = 400) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"search.py did not finish in {timeout:g}s:\n{log.read_text()[-4000:]}") from None


def trials_of(storage: str, study: str) -> list[FrozenTrial]:
    return optuna.load_study(study_name=study, storage=open_storage(storage)).get_trials(deepcopy=False)


def wait_for(condition: Callable[[], bool], what: str, *, timeout: float = 300, poll: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(poll)


def running_after_finished(storage: str, study: str, finished: int) -> Callable[[], bool]:
    """True once the study has ``finished`` finished trials and another one RUNNING (a worker is mid-trial)."""
    def check() -> bool:
        if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).exists():
            return False  # opening it here would create it
        try:
            trials = trials_of(storage, study)
        except KeyError:  # the study is not created yet
            return False
        states = collections.Counter(t.state for t in trials)
        # A RUNNING trial with its plan recorded is inside the objective, past its first heartbeat.
        busy = [t for t in trials if t.state == TrialState.RUNNING and "plan" in t.user_attrs]
        return states[TrialState.COMPLETE] + states[TrialState.PRUNED] >= finished and bool(busy)
    return check


def assert_one_consistent_study(trials: Sequence[FrozenTrial], target: int, out: Path, study: str) -> list[FrozenTrial]:
    """Numbered once each, none left running, the target reached, each seed evaluated once.

    (Seeds beyond a small target may still be WAITING in the queue: enqueued, never run.)
    """
    assert [t.number for t in trials] == list(range(len(trials)))
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) >= target
    seeds = [t.user_attrs["seed"] for t in finished if "seed" in t.user_attrs]
    assert seeds and len(seeds) == len(set(seeds)), f"seed plans evaluated more than once: {seeds}"
    for t in finished:
        if t.state == TrialState.COMPLETE:  # its checkpoint is on the shared --out, where export finds it
            assert Path(t.user_attrs["checkpoint"]) == checkpoint_file(study, t.number)
            assert (out / t.user_attrs["checkpoint"]).is_file()
    return finished


def test_two_workers_on_postgresql_share_one_study(worker_env, postgres_url, search_args, tmp_path: Path) -> None:
    """Two independent processes, as on two machines: one creates and seeds the study, both run trials."""
    args = search_args(tmp_path / "run", "pg-two", 6, "--storage", postgres_url)
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    workers = [start(args, worker_env, log) for log in logs]
    codes = [finish(w, log) for w, log in zip(workers, logs)]
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)

    finished = assert_one_consistent_study(trials_of(postgres_url, "pg-two"), 6, tmp_path / "run", "pg-two")
    assert len({t.user_attrs["worker"] for t in finished}) == 2, "both workers ran trials"
    assert sum("created with" in log.read_text() for log in logs) == 1, "the study was created (and seeded) once"
    assert (tmp_path / "run" / "pareto.csv").is_file() and (tmp_path / "run" / "best" / "plan.json").is_file()


def test_the_readme_postgresql_url_with_a_password_opens_and_stays_secret(postgres_url, tmp_path: Path) -> None:
    """``postgresql://USER:PASSWORD@HOST:PORT/DB`` as the README writes it, with the postgres extra's driver
    (SQLAlchemy 2.1 alone maps a bare postgresql:// to psycopg 3). The test server trusts loopback, so any
    password connects; what matters is that none is printed or written."""
    from search.config import SearchConfig
    from search.run import claim_run_dir, read_run_file

    assert postgres_url.startswith("postgresql://postgres@")
    url = postgres_url.replace("postgresql://postgres@", "postgresql://postgres:s3cret@")
    study = optuna.create_study(study_name="readme", storage=open_storage(url))
    study.enqueue_trial({"x": 1.0})
    assert [t.state for t in trials_of(postgres_url, "readme")] == [TrialState.WAITING]
    claim_run_dir(SearchConfig(budget_mflops=25.0, storage=url, study_name="readme", out=tmp_path))
    assert "s3cret" not in (tmp_path / "run.json").read_text()
    assert read_run_file(tmp_path).storage == postgres_url


def test_sigterm_is_handled_like_ctrl_c(worker_env, search_args, tmp_path: Path) -> None:
    """A batch system's SIGTERM to the search process: the running trial is marked failed (not left RUNNING
    until the heartbeat grace), the report is written, nothing is exported, and the exit status is 143."""
    out, storage, name, log = tmp_path / "run", f"sqlite:///{tmp_path / 'run' / 'study.db'}", "terminated", \
        tmp_path / "search.log"
    search = start(search_args(out, name, 20, "--finetune-steps", "40"), worker_env, log)
    wait_for(running_after_finished(storage, name, 0), "a running trial")
    search.send_signal(signal.SIGTERM)
    code = finish(search, log, timeout=120)
    text = log.read_text()
    assert code == 143, text[-4000:]
    trials = trials_of(storage, name)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], "no trial left RUNNING"
    assert any(t.state == TrialState.FAIL for t in trials)
    assert (out / "trials.csv").is_file() and not (out / "best").exists(), "report written, nothing exported"
    assert "best/" not in text and "Traceback" not in text


def test_workers_starting_together_on_a_new_postgresql_database_all_open_it(postgres_url, tmp_path: Path) -> None:
    """Four processes open a fresh database at the same instant (they race to create Optuna's tables)."""
    _open_together(postgres_url, tmp_path)


def test_workers_starting_together_on_a_new_sqlite_file_all_open_it(tmp_path: Path) -> None:
    """The same race on SQLite: the loser is told "UNIQUE constraint failed: alembic_version.version_num"."""
    _open_together(f"sqlite:///{tmp_path / 'study.db'}", tmp_path)


def _open_together(url: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    code = ("import pathlib, sys, time\n"
            "from search.storage import open_storage\n"
            "pathlib.Path(sys.argv[1] + '.ready' + sys.argv[3]).touch()\n"
            "while not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.01)\n"
            "open_storage(sys.argv[2])\n")
    openers = [subprocess.Popen([sys.executable, "-c", code, str(go), url, str(i)], cwd=REPO_ROOT,
                                stderr=subprocess.PIPE, text=True) for i in range(4)]
    wait_for(lambda: len(list(tmp_path.glob("go.ready*"))) == 4, "four processes ready", timeout=120, poll=0.1)
    go.touch()
    errors = [p.communicate(timeout=120)[1] for p in openers]
    assert [p.returncode for p in openers] == [0] * 4, "\n".join(errors)


POP_QUEUE = '''
import pathlib, sys, time, warnings
import optuna
from search.storage import open_storage
warnings.filterwarnings("ignore")
optuna.logging.set_verbosity(optuna.logging.ERROR)
ready, go, url = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
study = optuna.load_study(study_name="queue", storage=open_storage(url))
ready.touch()
while not go.exists():
    time.sleep(0.01)
study.optimize(lambda trial: trial.suggest_float("x", 0, 1000), n_trials=int(sys.argv[4]))
'''


def test_sqlite_workers_never_pop_the_same_queued_trial(tmp_path: Path) -> None:
    """Four processes drain one SQLite queue of 60 enqueued trials: each runs exactly once, none twice.

    (pysqlite starts no transaction for a SELECT, so Optuna's read-WAITING-then-set-RUNNING pop is not
    atomic on SQLite unless every transaction takes the write lock up front.)
    """
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    study = optuna.create_study(study_name="queue", storage=open_storage(url))
    for x in range(60):
        study.enqueue_trial({"x": float(x)})
    go = tmp_path / "go"
    poppers = [subprocess.Popen([sys.executable, "-c", POP_QUEUE, str(tmp_path / f"ready{i}"), str(go), url, "15"],
                                cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True) for i in range(4)]
    wait_for(lambda: len(list(tmp_path.glob("ready*"))) == 4, "four processes ready", timeout=120, poll=0.1)
    go.touch()
    errors = [p.communicate(timeout=300)[1] for p in poppers]
    assert [p.returncode for p in poppers] == [0] * 4, "\n".join(errors)
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.params["x"] for t in trials) == [float(x) for x in range(60)]
    assert all(t.state == TrialState.COMPLETE for t in trials)


def test_workers_2_on_sqlite(worker_env, search_args, tmp_path: Path) -> None:
    """``--workers 2`` on the default SQLite file: two children share it; the parent reports once."""
    out, log = tmp_path / "run", tmp_path / "search.log"
    code = finish(start(search_args(out, "sqlite-two", 6, "--workers", "2"), worker_env, log), log)
    text = log.read_text()
    assert code == 0, text[-4000:]

    finished = assert_one_consistent_study(trials_of(f"sqlite:///{out / 'study.db'}", "sqlite-two"), 6, out, "sqlite-two")
    assert len({t.user_attrs["worker"] for t in finished}) == 2, "both workers ran trials"
    assert "[worker 1]" in text and "[worker 2]" in text
    assert text.count("export: trial") == 1, "the parent alone exports, once"
    assert (out / "best" / "plan.json").is_file() and (out / "best" / "model.onnx").is_file()


def test_sigkill_mid_trial_then_restart_reaches_the_target(worker_env, search_args, tmp_path: Path) -> None:
    """Completed trials survive; the killed trial is failed by its stale heartbeat and retried once."""
    out, storage, name = tmp_path / "run", f"sqlite:///{tmp_path / 'run' / 'study.db'}", "killed"
    # Longer fine-tunes so that the trial is still running when the test kills its worker (and none of them
    # continued to 4x the steps: --long-finetunes 0; the leaders' continuation has its own test).
    args = search_args(out, name, 4, "--finetune-steps", "40", "--long-finetunes", "0")
    first = start(args, worker_env, tmp_path / "first.log")
    wait_for(running_after_finished(storage, name, 1), "one finished trial and one running")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)

    before = trials_of(storage, name)
    kept = {t.number: t.values for t in before if t.state == TrialState.COMPLETE}
    killed = [t.number for t in before if t.state == TrialState.RUNNING]
    assert kept and len(killed) == 1, [(t.number, t.state.name) for t in before]

    log = tmp_path / "second.log"
    code = finish(start(args, worker_env, log), log)
    assert code == 0, log.read_text()[-4000:]
    after = {t.number: t for t in trials_of(storage, name)}
    assert {n: after[n].values for n in kept} == kept, "completed trials are kept as they were"
    assert after[killed[0]].state == TrialState.FAIL
    retries = [t for t in after.values() if t.system_attrs.get("failed_trial") == killed[0]]
    assert len(retries) == 1 and retries[0].params == after[killed[0]].params, "re-queued once, same plan"
    assert_one_consistent_study(list(after.values()), 4, out, name)


def test_ctrl_c_marks_running_trials_failed_and_exits_130(worker_env, search_args, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the process group) on ``--workers 2``: trials marked, report written, status 130."""
    out, storage, name, log = tmp_path / "run", f"sqlite:///{tmp_path / 'run' / 'study.db'}", "interrupted", \
        tmp_path / "search.log"
    search = start(search_args(out, name, 20, "--workers", "2", "--finetune-steps", "40"), worker_env, log)
    wait_for(running_after_finished(storage, name, 0), "a running trial")
    os.killpg(search.pid, signal.SIGINT)
    code = finish(search, log, timeout=120)
    assert code == 130, log.read_text()[-4000:]

    trials = trials_of(storage, name)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], "no trial left RUNNING"
    assert any(t.state == TrialState.FAIL for t in trials)
    assert (out / "trials.csv").is_file() and not (out / "best").exists(), "report written, nothing exported"


def test_ctrl_c_while_optuna_creates_a_trial_fails_that_trial_and_queues_its_seed_again(
    teacher_cache: Path, search_args, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Optuna guards only the objective: a Ctrl-C inside ``study.ask()`` (here in the sampler, after the trial is
    RUNNING in the storage) left that trial RUNNING for good (the Ctrl-C test above failed that way once)."""
    from search.cli import config_from_args, parse_args
    from search.run import run_search

    def interrupted(self, study, trial) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(optuna.samplers.TPESampler, "before_trial", interrupted)
    monkeypatch.setenv("GKPD_CACHE", str(teacher_cache))
    config = config_from_args(parse_args(search_args(tmp_path / "run", "asked", 3)))
    assert run_search(config) == 130
    trials = trials_of(config.storage_url, "asked")
    assert trials[0].state == TrialState.FAIL and TrialState.RUNNING not in {t.state for t in trials}
    seed = trials[0].user_attrs["seed"]
    assert [t.number for t in trials if t.user_attrs.get("seed") == seed and t.state == TrialState.WAITING] == [
        len(trials) - 1]  # queued again, last


def test_nan_loss_and_out_of_memory_fail_the_trial_and_the_study_goes_on(
    teacher_cache: Path, search_args, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process: the first fine-tune hits a NaN loss, the second runs out of memory; both are recorded."""
    import search.trial
    from search.cli import config_from_args, parse_args
    from search.run import run_search

    real_distill = search.trial.distill
    failures = [FloatingPointError("loss is nan at step 1"), torch.OutOfMemoryError("CUDA out of memory (simulated)")]

    def distill(*args, **kwargs):
        if failures:
            raise failures.pop(0)
        return real_distill(*args, **kwargs)

    monkeypatch.setattr(search.trial, "distill", distill)
    monkeypatch.setenv("GKPD_CACHE", str(teacher_cache))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # --prune-margin 1: no trial stops early, so every trial reaches the fine-tune.
        config = config_from_args(parse_args(search_args(tmp_path / "run", "failing", 3, "--prune-margin", "1")))
        assert run_search(config) == 0
    finally:
        torch.set_num_threads(threads)

    trials = trials_of(config.storage_url, "failing")
    assert [t.state for t in trials[:2]] == [TrialState.FAIL, TrialState.FAIL]
    assert trials[0].user_attrs["fail_reason"] == "FloatingPointError: loss is nan at step 1"
    assert trials[1].user_attrs["fail_reason"].startswith("OutOfMemoryError: CUDA out of memory (simulated)")
    assert sum(t.state in FINISHED for t in trials) == 3
    report = (tmp_path / "run" / "trials.csv").read_text()
    assert "FloatingPointError: loss is nan" in report and "OutOfMemoryError" in report


def test_three_failures_in_a_row_write_the_report_then_stop_with_one_error(
    teacher_cache: Path, search_args, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import search.trial
    from search.cli import config_from_args, parse_args
    from search.run import SearchFailed, run_search

    def distill(*args, **kwargs):
        raise FloatingPointError("loss is nan at step 1")

    monkeypatch.setattr(search.trial, "distill", distill)
    monkeypatch.setenv("GKPD_CACHE", str(teacher_cache))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = config_from_args(parse_args(search_args(tmp_path / "run", "broken", 5, "--prune-margin", "1")))
        with pytest.raises(SearchFailed, match="3 trials in a row failed .*loss is nan at step 1"):
            run_search(config)
    finally:
        torch.set_num_threads(threads)
    states = [t.state for t in trials_of(config.storage_url, "broken")]
    # The first three seeds failed; the rest of the queued seeds wait for a run that can train.
    assert states[:3] == [TrialState.FAIL] * 3 and set(states[3:]) <= {TrialState.WAITING}
    assert (tmp_path / "run" / "trials.csv").read_text().count("FloatingPointError: loss is nan") == 3
    assert not (tmp_path / "run" / "best").exists()


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1 is loopback too


def _listening_addresses(pid: int) -> set[str]:
    """The IP addresses that ``pid`` and its descendants listen on (TCP)."""
    import psutil

    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    pids = {p.pid for p in family}
    return {c.laddr.ip for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


def test_ray_tune_backend_on_local_ray_writes_the_optuna_study(local_ray_env, search_args, tmp_path: Path) -> None:
    """Tune runs the trials on a local Ray bound to 127.0.0.1; results land in the study; ``report`` reads it."""
    out, log = tmp_path / "run", tmp_path / "search.log"
    search = start(search_args(out, "ray", 3, "--backend", "ray", "--cpus-per-trial", "1"), local_ray_env, log)
    addresses: set[str] = set()
    while search.poll() is None:
        addresses |= _listening_addresses(search.pid)
        time.sleep(0.5)
    code = finish(search, log)
    assert code == 0, log.read_text()[-4000:]
    assert addresses and all(_loopback(a) for a in addresses), f"Ray listened on {addresses}"

    trials = trials_of(f"sqlite:///{out / 'study.db'}", "ray")
    finished = assert_one_consistent_study(trials, 3, out, "ray")
    assert all(t.user_attrs.get("ray_trial_id") for t in finished), "every trial ran as a Ray Tune trial"
    report = subprocess.run([*SEARCH, "report", "--out", str(out)], check=False, cwd=REPO_ROOT, env=local_ray_env,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "Pareto frontier" in report.stdout
    completed = [t.number for t in finished if t.state == TrialState.COMPLETE]
    rows = [line.split("|")[1].strip() for line in report.stdout.splitlines() if line.startswith("| ")][1:]
    assert rows and set(rows) <= {str(n) for n in completed}
