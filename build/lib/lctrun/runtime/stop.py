"""Stopping cleanly: a signal during training asks for a stop between two steps.

A step is never cut in half, so the state saved at the stop is one a resumed run can continue from
exactly. A second signal stops at once (KeyboardInterrupt), keeping only the finished epochs. In one
process the signals are Ctrl-C (SIGINT) and SIGTERM; a launcher asks its workers with SIGUSR1.
"""

from __future__ import annotations

import signal
import threading
import time


class StopRequest:
    def __init__(self, signals: tuple[int, ...]):
        # only the main thread can take signals (a run inside a thread just cannot be stopped this way)
        self.signals = signals if threading.current_thread() is threading.main_thread() else ()
        self.signal: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> StopRequest:
        # a signal the launcher ignores (SIGINT in its children) stays ignored
        taken = [s for s in self.signals if signal.getsignal(s) is not signal.SIG_IGN]
        self._previous = {s: signal.signal(s, self._handle) for s in taken}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def __bool__(self) -> bool:
        return self.signal is not None


class EpochInterrupted(Exception):
    """Raised by a runtime at a stop between steps, with what it needs to finish the epoch later."""

    def __init__(self, partial: dict):
        super().__init__(f"stopped after step {partial['step']}")
        self.partial = partial


class EpochProgress:
    """A runtime's running sums over one pass of a loader: what a stop saves and a resume continues."""

    def __init__(self, loader, partial: dict | None = None, params: list | None = None):
        self.loader = loader
        self.params = partial.get("params") if partial else params  # each group's parameters at the epoch's start
        self.total: dict = dict(partial["total"]) if partial else {}
        self.samples = partial["samples"] if partial else 0
        self.start = time.perf_counter() - (partial["seconds"] if partial else 0.0)
        self.first_step = partial["step"] + 1 if partial else 1
        if partial:
            loader.resume_at(partial["position"])

    def steps(self):
        """(step, batch) from where the pass stands, steps numbered from 1 at the epoch's start."""
        return enumerate(self.loader, self.first_step)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def interrupted(self, step: int) -> EpochInterrupted:
        """The stop after `step`, carrying what `EpochProgress(loader, partial)` needs to go on."""
        partial = {"step": step, "total": self.total, "samples": self.samples, "seconds": self.seconds}
        partial["params"] = self.params
        return EpochInterrupted({**partial, "position": self.loader.position(step)})
