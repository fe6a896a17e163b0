"""The training pass over a loader, written once for both runtimes.

Per step the loop asks the runtime to execute the step (`run_step`: every stage in turn in one process, or
this worker's stage and its messages), adds the step's metrics to running sums that stay on the device,
reads those sums for NaN/Inf every CHECK_EVERY steps (each read waits for the device), advances the progress
bar, and stops between two steps when asked (`stops_after`). A stop drains what is in flight and raises
EpochInterrupted with what a later `train_pass(..., partial=...)` needs to finish the pass.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from lctrun.data import TensorLoader
from lctrun.errors import LctrunError
from lctrun.runtime.accounting import SavedTensors
from lctrun.runtime.base import autocast_of
from lctrun.runtime.faults import InjectedFault
from lctrun.runtime.stop import EpochInterrupted

CHECK_EVERY = 16  # steps between NaN/Inf checks: a NaN stays NaN in the sums, so none is missed, only seen late


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
        total = {key: value.cpu() for key, value in self.total.items()}
        partial = {"step": step, "total": total, "samples": self.samples, "seconds": self.seconds}
        partial["params"] = self.params
        return EpochInterrupted({**partial, "position": self.loader.position(step)})


class PassRunner(Protocol):
    """What `train_pass` needs of a runtime besides the loop itself."""

    method: object  # its .name names the method in a divergence error
    stages: list  # the stages this process steps: their precision and devices set the autocast
    fault: InjectedFault
    account: dict  # {"activations_mb": ...} of the first step, measured by the loop

    def start_params(self) -> list[torch.Tensor]: ...  # each group's parameters before the pass (update norms)
    def begin_pass(self, run: EpochProgress, partial: dict | None) -> None: ...
    def run_step(self, batch, step: int) -> dict[str, torch.Tensor]: ...  # the step's metrics (sums over the batch)
    def stops_after(self, step: int, stop, steps: int) -> bool: ...  # every worker agrees on the answer
    def end_pass(self, stopped: bool) -> dict: ...  # drain messages in flight; what a stop must carry on
    def group_of(self, key: str) -> int: ...  # the group (from 1) a metric of the running sums belongs to
    def finish_pass(self, run: EpochProgress) -> dict[str, float]: ...  # the pass's metrics; sets worker_stats


def add_metrics(total: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Add a step's metrics to the running sums, on the metrics' device (no wait for it)."""
    for key, value in metrics.items():
        key = prefix + key
        total[key] = total[key] + value.detach() if key in total else value.detach()


def check_finite(runner: PassRunner, total: dict[str, torch.Tensor], epoch: int, step: int) -> None:
    """Stop when a loss (or constraint residual) has been NaN/Inf, naming the group and the step it was seen by."""
    keys = [key for key in total if key.endswith(("loss", "residual"))]
    if not keys or bool(torch.stack([total[key].isfinite().all() for key in keys]).all()):
        return
    key = next(key for key in keys if not bool(total[key].isfinite().all()))
    raise LctrunError(
        f"training diverged: {key} is {float(total[key].sum())} in method {runner.method.name}, "
        f"group {runner.group_of(key)}, epoch {epoch}, by step {step} (try a smaller optim.lr); "
        "the run directory keeps every finished epoch"
    )


def train_pass(
    runner: PassRunner, loader: TensorLoader, on_batch=None, stop=None, partial: dict | None = None
) -> dict[str, float]:
    """One pass over `loader`; `partial` continues a pass that `stop` ended early (an EpochInterrupted's)."""
    run = EpochProgress(loader, partial, runner.start_params())
    runner.begin_pass(run, partial)
    stopped = step = 0
    for step, batch in run.steps():
        runner.fault.tick()
        if not runner.account:
            with SavedTensors() as saved, autocast_of(runner.stages):
                metrics = runner.run_step(batch, step)
            runner.account = {"activations_mb": round(saved.bytes / 2**20, 3)}
        else:
            with autocast_of(runner.stages):
                metrics = runner.run_step(batch, step)
        add_metrics(run.total, metrics)
        if step % CHECK_EVERY == 0:
            check_finite(runner, run.total, loader.epoch, step)
        run.samples += len(batch.y)
        if on_batch:
            on_batch()
        if runner.stops_after(step, stop, len(loader)):
            stopped = step
            break
    carry = runner.end_pass(bool(stopped))
    check_finite(runner, run.total, loader.epoch, step)
    if stopped:
        interrupted = run.interrupted(stopped)
        interrupted.partial.update(carry)
        raise interrupted
    return runner.finish_pass(run)
