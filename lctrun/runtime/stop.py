"""Stopping cleanly: a signal during training asks for a stop between two steps.

A step is never cut in half, so the state saved at the stop is one a resumed run can continue from
exactly. A second signal stops at once (KeyboardInterrupt), keeping only the finished epochs. In one
process the signals are Ctrl-C (SIGINT) and SIGTERM; a launcher asks its workers with SIGUSR1.
"""

from __future__ import annotations

import signal
import threading


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
