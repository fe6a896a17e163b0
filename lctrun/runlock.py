"""One run per directory: a lock file in it, made create-exclusive, naming the process that holds it.

`train`, `train --resume` and `compare` hold the lock of their directory while they run; a second one is
refused, naming the holder. Workers that lctrun starts (distributed, or an isolated serial run) run under
their launcher's lock; under torchrun, rank 0 holds it for all. A lock whose process is gone (kill -9) is
taken over, and the new holder says so. The lock goes when its holder ends, however it ends, short of kill -9.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from lctrun.errors import LctrunError
from lctrun.reporting.rundir import make_run_dir

LOCK_NAME = ".lctrun.lock"


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / LOCK_NAME


def process_start(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot, from /proc): tells a reused process id from its holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def this_process() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start": process_start(pid), "since": time.strftime("%H:%M:%S")}


def read_holder(path: Path) -> dict | None:
    """The holder a lock file names (None: unreadable, e.g. being written this instant)."""
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def is_gone(holder: dict) -> bool:
    """Whether the holder's process no longer runs (only knowable on its own host)."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's process: alive
    start = process_start(holder["pid"])
    return start is not None and holder.get("start") is not None and start != holder["start"]  # pid reused


def describe(holder: dict | None) -> str:
    if holder is None:
        return "another lctrun process"
    return f"lctrun process {holder['pid']} on {holder.get('host', '?')} (since {holder.get('since', '?')})"


def acquire(run_dir: Path, option: str) -> dict | None:
    """Take the lock of `run_dir` (made if missing); returns the holder of a stale lock taken over, else None.
    A live holder's lock is refused in one line."""
    path = lock_path(run_dir)
    taken_over = None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileNotFoundError:  # the directory went (another run's clean-up): make it again
            make_run_dir(run_dir)
            continue
        except FileExistsError:
            holder = read_holder(path)
            if holder is not None and is_gone(holder) and taken_over is None:
                # Read again just before removing: a second process taking over at the same time then mostly
                # finds the first one's new lock, and is refused (the window left is between these two lines).
                if read_holder(path) == holder:
                    path.unlink(missing_ok=True)
                taken_over = holder
                continue
            hint = "" if holder is None or holder.get("host") == socket.gethostname() else " elsewhere"
            raise LctrunError(
                f"{option} {run_dir} is in use by {describe(holder)}: wait for it to end, or give another "
                f"directory (if no lctrun runs there{hint}, delete {path})"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(this_process(), f)
        return taken_over
    raise LctrunError(f"{option} {run_dir}: cannot take its lock {path}; give another directory")


def release(run_dir: Path) -> None:
    path = lock_path(run_dir)
    if (holder := read_holder(path)) is not None and holder["pid"] == os.getpid():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(run_dir: Path, option: str = "--out", console=None):
    """Hold the lock of `run_dir` while the body runs. A directory made here and left empty (the run failed on
    input found late, e.g. a cut that does not exist) is removed again: a failed start leaves nothing."""
    run_dir = Path(run_dir)
    made = not run_dir.exists()
    make_run_dir(run_dir)
    try:
        stale = acquire(run_dir, option)
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise
    if stale is not None and console is not None:
        console.print(f"took over the lock of {run_dir} from {describe(stale)}, which no longer runs")
    try:
        yield
    finally:
        release(run_dir)
        if made:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only if empty
