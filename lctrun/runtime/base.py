"""What every runtime gives the training loop (the `Runtime` protocol), and the helpers both runtimes use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from lctrun.precision import autocast


@runtime_checkable
class Runtime(Protocol):
    """Everything the training loop (train.py), checkpoints and bench use of a runtime. SerialRuntime runs
    every stage in this process; DistributedRuntime runs this process's one stage and talks to the others."""

    rank: int  # this process's worker (0 for the serial runtime)
    is_main: bool  # writes the run directory, prints
    needs_inputs: bool  # reads the batches' inputs (the others receive activations)
    checkpoint_tag: str  # "" or ".rank<r>": this process's checkpoint files
    stop_signals: tuple  # the signals that ask this process for a stop between two steps
    worker_stats: list[dict]  # per worker, after train_epoch: compute/wait seconds, bytes, memory
    stages: list  # the stages this process holds: every group's (serial) or this worker's one (distributed)

    def begin_epoch(self, plan: Any) -> None: ...  # the method's plan for the epoch (phase, wire)
    def refresh(self, loader: Any) -> None: ...  # a no-learning pass (penalty/al refresh)
    def train_epoch(self, loader: Any, on_batch=None, stop=None, partial=None) -> dict[str, float]: ...
    def evaluate(self, loader: Any) -> EvalOutput | None: ...  # None on workers that are not the main one
    @property
    def lr(self) -> float: ...
    def barrier(self) -> None: ...
    def agree(self, value): ...  # rank 0's value, on every worker
    def gather(self, value) -> list: ...  # every worker's value, on every worker
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class OneStagePerProcess:
    """The Runtime members of a process that holds one stage (`self.stage`) in a process group of `self.world`
    workers: the distributed runtime (one group per worker) and the data-parallel one (one replica per worker)."""

    @property
    def lr(self) -> float:
        return self.stage.lr

    def barrier(self) -> None:
        dist.barrier()

    def state_dict(self) -> dict:
        return {"stages": [self.stage.state_dict()]}  # the plain group's keys: the same as in one process

    def load_state_dict(self, state: dict) -> None:
        self.stage.load_state_dict(state["stages"][0])

    def agree(self, value):
        """Every worker gets rank 0's value (run directory, resume epoch)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every worker's value, on every worker (e.g. which checkpoints each one holds)."""
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values


@dataclass
class EvalOutput:
    labels: torch.Tensor  # (N,)
    logits: list[torch.Tensor | None]  # per group: sub-model logits (None if the method has none); last = main


def autocast_of(stages: list):
    """The autocast context the stages' forwards run in (a no-op at fp32)."""
    return autocast(stages[0].ctx.precision, [s.device for s in stages])


def parameters_of(stage) -> torch.Tensor:
    """A copy of the group's parameters, flat: what `update_norm` measures an epoch's change from."""
    return torch.cat([q.detach().float().flatten().cpu() for q in stage.group.parameters()])


def update_norm(stage, before: torch.Tensor) -> dict[str, torch.Tensor]:
    """||theta_end - theta_start|| of the group over an epoch: how much it learnt (metrics: gK_update_norm)."""
    return {"update_norm": (parameters_of(stage) - before).norm()}


def microbatch_count(batch_size: int, microbatches: int) -> int:
    """How many equal parts a batch splits into: M, or for a smaller last batch the largest divisor of its size
    below M (equal parts keep every part's weight 1/n and the pipelines' message shapes fixed)."""
    return max(d for d in range(1, min(microbatches, batch_size) + 1) if batch_size % d == 0)


def stage_prefix(k: int, num_groups: int) -> str:
    """Metrics of the last group are the model's own; the others are prefixed with their group."""
    return "" if k == num_groups - 1 else f"g{k + 1}_"


def averages(total: dict[str, torch.Tensor], samples: int) -> dict[str, float]:
    """Turn summed losses, residuals and correct counts into means and accuracies (%)."""
    out = {}
    for key, value in total.items():
        if key.endswith(("loss", "residual")):
            out[key] = float(value) / max(samples, 1)
        elif key.endswith("correct"):
            out[key[: -len("correct")] + "acc"] = 100.0 * float(value) / max(samples, 1)
        elif key != "n":
            out[key] = float(value)
    return out
