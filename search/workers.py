"""``--workers N``: one study, N worker processes on this machine (``--backend ray`` goes to ``ray_backend``).

The parent validates the input and prepares once: the teacher is trained and cached (or loaded), the study
is created with its seeds. Then it starts N children running the same command line with ``--workers 1``
(and ``$GKPD_WORKER`` set, so that they leave the report to the parent). Each child joins the study and runs
trials until the study holds ``--trials`` finished ones; the storage numbers every trial once, and a child
whose worker dies leaves a trial that the heartbeat fails and re-queues. The parent waits, then writes the
report and the export once.

Ctrl-C in a terminal reaches the whole process group: each child marks its running trial failed and stops;
the parent waits for them, writes the report (no export) and exits 130. A SIGINT sent to the parent alone
is passed on to the children that are still running after a few seconds; a SIGTERM (which no terminal
sends to the group) is passed on at once, and the parent exits 143.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from search.config import SearchConfig
from search.progress import duration, log
from search.run import WORKER_ENV, Terminated, finish, interrupted_status, prepare_study
from search.study import finished_count

__all__ = ["run_distributed", "run_workers", "worker_command", "worker_env"]

REPO_ROOT = Path(__file__).resolve().parent.parent
# After Ctrl-C, children that got it from the terminal stop within a second or two; only the ones still
# running after this long are sent SIGINT by the parent (a second SIGINT would cut their cleanup short).
FORWARD_SIGINT_AFTER = 5.0
# Children still running this long after SIGINT are killed; heartbeats then fail their trials.
KILL_AFTER = 120.0


def run_distributed(config: SearchConfig, argv: Sequence[str]) -> int:
    """``main``'s entry for ``--workers N > 1`` and ``--backend ray``."""
    if config.backend == "ray":
        from search.ray_backend import run_ray

        return run_ray(config)
    return run_workers(config, argv)


def worker_command(argv: Sequence[str]) -> list[str]:
    """The same search as ``argv`` as one worker process (the last ``--workers`` on a command line wins)."""
    return [sys.executable, "-c", "from search import main; main()", *argv, "--workers", "1"]


def worker_env(index: int, workers: int) -> dict[str, str]:
    """The children share the cores: each gets cores // N torch threads unless the user chose otherwise."""
    env = dict(os.environ)
    env[WORKER_ENV] = f"{index}/{workers}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, threads)
    return env


def run_workers(config: SearchConfig, argv: Sequence[str]) -> int:
    start = time.perf_counter()
    if config.storage_url.startswith("journal:"):
        log("workers: note: journal storage has no heartbeats; a worker killed mid-trial leaves that trial "
            "RUNNING and the others wait for it (use SQLite or PostgreSQL to have it failed and retried)")
    # Bad input fails here, before any child starts; the teacher is trained once; the seeds are enqueued once.
    prepared, study = prepare_study(config)
    del prepared  # the children load their own data and teacher; the parent only waits and reports
    gc.collect()
    already = finished_count(study)
    log(f"workers: starting {config.workers} worker processes ({os.cpu_count()} cores, "
        f"{worker_env(1, config.workers)['OMP_NUM_THREADS']} torch threads each); {already} finished trials "
        f"in the study, target {config.trials}")
    children = [_Child(i, config.workers, argv) for i in range(1, config.workers + 1)]
    interrupted: KeyboardInterrupt | None = None
    try:
        for child in children:
            child.process.wait()
    except KeyboardInterrupt as stop:
        interrupted = stop
        log("workers: interrupted; waiting for the workers to mark their running trials failed")
        _stop(children, signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
    for child in children:
        child.drain()
    elapsed = time.perf_counter() - start
    done = finished_count(study)
    codes = {child.index: child.process.returncode for child in children}
    failed = {index: code for index, code in codes.items() if code != 0}
    if interrupted is not None:
        finish(config, study, elapsed=elapsed, export=False)
        return interrupted_status(interrupted)
    for index, code in failed.items():
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        log(f"workers: worker {index} ended with {how} (its log lines above start with [worker {index}])")
    log(f"workers: {done - already} trials finished in {duration(elapsed)} by {config.workers} workers")
    reached = done >= config.trials
    # All workers stopping normally short of the target means --timeout: export the best so far, as one
    # process would. A worker that failed short of the target is an error.
    finish(config, study, elapsed=elapsed, export=reached or not failed)
    return 0 if reached or not failed else 1


class _Child:
    """One worker process; its output is relayed line by line with a ``[worker i]`` prefix."""

    def __init__(self, index: int, workers: int, argv: Sequence[str]) -> None:
        self.index = index
        # Same process group as the parent, so that a terminal's Ctrl-C reaches every worker at once.
        self.process = subprocess.Popen(
            worker_command(argv), env=worker_env(index, workers), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
        )
        self.relay = threading.Thread(target=_relay, args=(self.process.stdout, f"[worker {index}] "), daemon=True)
        self.relay.start()

    def drain(self) -> None:
        self.relay.join(timeout=10)


def _relay(stream: IO[str], prefix: str) -> None:
    for line in stream:
        sys.stderr.write(prefix + line)
        sys.stderr.flush()


def _stop(children: Sequence[_Child], signum: int) -> None:
    """Wait for the children to stop; pass ``signum`` on to the ones that did not get it; kill the ones that hang.

    A terminal's Ctrl-C reached them already, so SIGINT is passed on only after a delay; SIGTERM at once.
    """
    interrupted_at = time.monotonic()
    forward_at = interrupted_at + (FORWARD_SIGINT_AFTER if signum == signal.SIGINT else 0.0)
    forwarded = False
    while any(child.process.poll() is None for child in children):
        try:
            time.sleep(0.2)
        except KeyboardInterrupt:
            forward_at = 0.0  # a second Ctrl-C: pass it on now
        now = time.monotonic()
        if not forwarded and now >= forward_at:
            for child in children:
                if child.process.poll() is None:
                    child.process.send_signal(signum)
            forwarded = True
        if now - interrupted_at > KILL_AFTER:
            for child in children:
                if child.process.poll() is None:
                    log(f"workers: worker {child.index} did not stop; killing it (its trial fails by heartbeat)")
                    child.process.kill()
            break
    for child in children:
        child.process.wait()
