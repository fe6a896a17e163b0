"""Run work in fresh local processes; if one fails, stop the rest and raise one line naming it.

Used for the distributed runtime's workers and for isolating runs whose peak memory is measured
(a process's RSS high-water mark never falls, so each measured run needs a process of its own).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch
from rich.console import Console

from lctrun.errors import LctrunError


def _exit_with_parent(parent: int, exchange: str) -> None:
    """A parent killed outright (kill -9) cannot stop its children, nor remove its exchange folder: they
    notice, remove it, and exit by themselves."""
    while os.getppid() == parent:
        time.sleep(0.5)
    shutil.rmtree(exchange, ignore_errors=True)
    os._exit(1)


def _report(exchange: str, rank: int, message: str, trace: str) -> None:
    """A failure, for the parent: a file, not a multiprocessing queue (whose semaphore a killed parent
    would leak, with a warning at exit)."""
    with contextlib.suppress(OSError):
        Path(exchange, f"error-{rank}.pkl").write_bytes(pickle.dumps((rank, message, trace)))


def _child(body, rank: int, exchange: str, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops its children; Ctrl-C goes to it
    threading.Thread(target=_exit_with_parent, args=(parent, exchange), daemon=True).start()
    try:
        result = body(rank)
        if rank == 0:
            # through a file, not a pipe: a large result would block the child until the parent reads it
            Path(exchange, "result.pkl").write_bytes(pickle.dumps(result))
    except LctrunError as e:
        _report(exchange, rank, str(e), "")
        raise SystemExit(3) from None
    except BaseException as e:  # report any failure to the parent, which stops the other processes
        _report(exchange, rank, f"{type(e).__name__}: {e}", traceback.format_exc())
        raise SystemExit(1) from None


def run_processes(body, count: int, what: str = "worker", where="", console=None):
    """Call body(rank) for rank 0..count-1, each in a fresh process; return rank 0's result.

    `where`: text (or a function giving it, asked after the failure) to end an error message with."""
    ctx = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="lctrun-", ignore_cleanup_errors=True) as tmp:
        procs = [ctx.Process(target=_child, args=(body, r, tmp, os.getpid()), daemon=True) for r in range(count)]
        for proc in procs:
            proc.start()
        try:
            failed = watch(procs)
        except KeyboardInterrupt:
            ask_to_stop(procs)
            stop(procs)
            stopped = f"the {what} stopped" if count == 1 else f"all {count} {what}s stopped"
            raise LctrunError(f"interrupted: {stopped}{_text(where)}") from None
        if failed is not None:
            exit_codes = [p.exitcode for p in procs]  # before the rest are stopped: who died by itself
            stop(procs)
            written = sorted(Path(tmp).glob("error-*.pkl"), key=lambda p: p.stat().st_mtime_ns)  # first failure first
            reports = [pickle.loads(p.read_bytes()) for p in written]
            rank, message, trace = root_cause(exit_codes, reports)
            if trace and os.environ.get("LCTRUN_DEBUG"):
                (console or Console(stderr=True)).print(trace, markup=False)
            name = f"worker {rank} (group {rank + 1})" if what == "worker" else what
            stopped = "" if count == 1 else f"; all {what}s stopped"
            raise LctrunError(f"{name} failed: {message}{stopped}{_text(where)}")
        return pickle.loads(Path(tmp, "result.pkl").read_bytes())


def _text(where) -> str:
    return where() if callable(where) else where


TRANSPORT = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "distbackenderror", "timed out")


def root_cause(exit_codes: list[int | None], reports: list[tuple[int, str, str]]) -> tuple[int, str, str]:
    """When one process fails its peers fail too (their connection to it closes): name the first cause.

    `exit_codes` are taken before the survivors are stopped. A process killed by a signal then, with
    no report of its own, comes first; then a reported error that is not about the connection
    between processes; then whatever was reported."""
    reported = {rank for rank, _, _ in reports}
    for rank, code in enumerate(exit_codes):
        if code is not None and code < 0 and rank not in reported:
            return rank, f"died (signal {-code})", ""
    own = [r for r in reports if not any(word in r[1].lower() for word in TRANSPORT)]
    if own or reports:
        rank, message, trace = (own or reports)[0]
        line = message.strip().splitlines()[0] if message.strip() else "failed"
        return rank, line[:300] + ("..." if len(line) > 300 else ""), trace
    rank = next(r for r, code in enumerate(exit_codes) if code not in (None, 0))
    return rank, f"died (exit code {exit_codes[rank]})", ""


def watch(procs) -> int | None:
    """Wait for the processes; the rank of the first that failed, or None when all succeeded."""
    while True:
        codes = [p.exitcode for p in procs]
        for rank, code in enumerate(codes):
            if code not in (None, 0):
                return rank
        if all(code == 0 for code in codes):
            return None
        time.sleep(0.05)


def ask_to_stop(procs, grace: float = 30.0) -> None:
    """SIGUSR1: a training run stops after its current step and saves it (runtime/stop.py). Wait up to
    `grace` s for every process to finish; a second Ctrl-C stops waiting."""
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGUSR1)
    deadline = time.time() + grace
    try:
        while any(p.is_alive() for p in procs) and time.time() < deadline:
            time.sleep(0.05)
    except KeyboardInterrupt:
        pass


def stop(procs, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after `grace` s."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.time() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join()
