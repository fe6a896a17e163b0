"""Faults on purpose, for the reliability tests: LCTRUN_INJECT_FAULT=RANK:STEP[:KIND].

STEP counts training steps of this process from its start (across epochs), so a fault can land in
any epoch. KIND: raise (an exception), kill (SIGKILL, no clean-up at all), interrupt (SIGINT, as
Ctrl-C), term (SIGTERM, as a scheduler's stop), stop (SIGUSR1, as the launcher asks its workers
after a Ctrl-C). Off unless the variable names this worker's rank.
"""

from __future__ import annotations

import os
import signal

KINDS = {"kill": signal.SIGKILL, "interrupt": signal.SIGINT, "term": signal.SIGTERM, "stop": signal.SIGUSR1}


class InjectedFault:
    def __init__(self, step: int | None = None, kind: str = "raise"):
        self.step, self.kind, self.steps = step, kind, 0

    @classmethod
    def from_env(cls, rank: int) -> InjectedFault:
        parts = os.environ.get("LCTRUN_INJECT_FAULT", "").split(":")
        if len(parts) >= 2 and parts[0] == str(rank):
            return cls(int(parts[1]), parts[2] if len(parts) > 2 else "raise")
        return cls()

    def tick(self) -> None:
        """Called once per training step."""
        self.steps += 1
        if self.steps != self.step:
            return
        if self.kind in KINDS:
            os.kill(os.getpid(), KINDS[self.kind])
            return
        raise RuntimeError(f"injected fault at step {self.steps}")
