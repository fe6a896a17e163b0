"""The processes a test's launcher started, found from /proc while it runs, so an orphan check can fail."""

import time
from pathlib import Path


def descendants(pid: int) -> set[int]:
    """Every living descendant of `pid` (children of each of its threads, recursively)."""
    found: set[int] = set()
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = {int(c) for c in children.read_text().split()}
        except (FileNotFoundError, ProcessLookupError):
            continue
        for kid in kids - found:
            found |= {kid} | descendants(kid)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is left


def still_alive(pids: set[int], seconds: float = 10.0) -> list[int]:
    """The pids still running after up to `seconds`."""
    deadline = time.time() + seconds
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    return sorted(p for p in pids if alive(p))
