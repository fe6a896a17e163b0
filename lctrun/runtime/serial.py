"""One process runs every stage in turn (groups may still sit on different devices)."""

from __future__ import annotations

import signal
from collections.abc import Callable

import torch

from lctrun.data import TensorLoader
from lctrun.methods import EpochPlan, Method, Stage
from lctrun.runtime.accounting import state_account
from lctrun.runtime.base import (
    EvalOutput,
    autocast_of,
    averages,
    microbatch_count,
    parameters_of,
    stage_prefix,
    update_norm,
)
from lctrun.runtime.faults import InjectedFault
from lctrun.runtime.loop import EpochProgress, add_metrics, train_pass
from lctrun.runtime.memory import PeakMemoryOf


def to(x: torch.Tensor | None, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """A message handed to the stage on `device`, in the dtype it travels in between processes (the same
    cast as the distributed runtime's, so that both give the same updates); None: the data, as loaded."""
    return None if x is None else x.to(device, dtype, non_blocking=True)


class SerialRuntime:
    is_main = True
    needs_inputs = True
    rank = 0
    checkpoint_tag = ""
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # each asks for a stop between two steps

    def __init__(self, method: Method, stages: list[Stage]):
        self.method, self.stages = method, stages
        self.memory = PeakMemoryOf([s.device for s in stages])
        self.account: dict[str, float] = {}
        self.worker_stats: list[dict] = []
        self.fault = InjectedFault.from_env(0)

    # -- one training pass (runtime/loop.py runs it) -------------------------------------------------
    def train_epoch(
        self, loader: TensorLoader, on_batch: Callable[[], None] | None = None, stop=None, partial: dict | None = None
    ) -> dict[str, float]:
        return train_pass(self, loader, on_batch, stop, partial)

    def start_params(self) -> list[torch.Tensor]:
        return [parameters_of(s) for s in self.stages]

    def begin_pass(self, run: EpochProgress, partial: dict | None) -> None:
        for stage in self.stages:
            stage.train(True)

    def run_step(self, batch, step: int) -> dict[str, torch.Tensor]:
        metrics: dict[str, torch.Tensor] = {}
        n = microbatch_count(len(batch.y), self.stages[0].wire.microbatches)
        if n == 1:
            self.step_batch(batch.x, batch.y, batch.idx, metrics)
            return metrics
        for i, part in enumerate(zip(batch.x.chunk(n), batch.y.chunk(n), batch.idx.chunk(n), strict=True)):
            for stage in self.stages:
                stage.begin_microbatch(i, n)
            self.step_batch(*part, metrics)
        return metrics

    def step_batch(self, x, y, idx, metrics: dict) -> None:
        """Every stage's step on one batch (or micro-batch), their metrics added to `metrics`."""
        K = len(self.stages)
        if self.stages[0].wire.order == "backward":
            return self.step_last_first(x, y, idx, metrics)
        backward: list[torch.Tensor | None] = [None] * K
        for k, stage in enumerate(self.stages):
            out = stage.train_step(to(x, stage.device, stage.wire.dtype if k else None), to(y, stage.device), idx)
            add_metrics(metrics, out.metrics, stage_prefix(k, K))
            backward[k], x = out.backward, out.forward
        for k in range(K - 2, -1, -1):
            stage = self.stages[k]
            if stage.wire.feedback_shape is not None:
                deferred = stage.feedback(to(backward[k + 1], stage.device, stage.wire.feedback_dtype))
                if deferred is not None:
                    backward[k] = deferred

    def step_last_first(self, x, y, idx, metrics: dict) -> None:
        """A batch of a wire with order="backward": group K steps first, each group's backward message is
        group k-1's feedback for this batch, and the forward messages are stored afterwards."""
        K, target = len(self.stages), None
        forward: list[torch.Tensor | None] = [None] * K
        for k in range(K - 1, -1, -1):
            stage = self.stages[k]
            if k < K - 1:
                stage.feedback(to(target, stage.device, stage.wire.feedback_dtype))
            out = stage.train_step(to(x, stage.device) if k == 0 else None, to(y, stage.device), idx)
            add_metrics(metrics, out.metrics, stage_prefix(k, K))
            target, forward[k] = out.backward, out.forward
        for k in range(1, K):
            stage = self.stages[k]
            stage.store_input(to(forward[k - 1], stage.device, stage.wire.dtype))

    def stops_after(self, step: int, stop, steps: int) -> bool:
        return bool(stop) and step < steps

    def end_pass(self, stopped: bool) -> dict:
        return {}

    def group_of(self, key: str) -> int:
        prefix = key.split("_", 1)[0]
        return int(prefix[1:]) if prefix[:1] == "g" and prefix[1:].isdigit() else len(self.stages)

    def finish_pass(self, run: EpochProgress) -> dict[str, float]:
        for k, stage in enumerate(self.stages):
            add_metrics(run.total, update_norm(stage, run.params[k]), stage_prefix(k, len(self.stages)))
        seconds = round(run.seconds, 3)
        devices = ",".join(sorted({str(s.device) for s in self.stages}))
        state = [state_account(s) for s in self.stages]
        self.worker_stats = [
            {
                "worker": 0,
                "group": "all",
                "device": devices,
                "bytes_sent": 0,
                "bytes_received": 0,
                "wait_s": 0.0,
                "seconds": seconds,
                "compute_s": seconds,
                "peak_mem_mb": round(self.memory.peak_bytes() / 2**20, 1),
                **{key: round(sum(s[key] for s in state), 3) for key in state[0]},
                **self.account,
            }
        ]
        return averages(run.total, run.samples)

    def begin_epoch(self, plan: EpochPlan) -> None:
        for stage in self.stages:
            stage.begin_epoch(plan)

    @torch.no_grad()
    def refresh(self, loader: TensorLoader) -> None:
        with autocast_of(self.stages):
            self._refresh(loader)

    def _refresh(self, loader: TensorLoader) -> None:
        for stage in self.stages:
            stage.train(True)
        for batch in loader:
            h = batch.x
            for k, stage in enumerate(self.stages):
                h = stage.refresh_step(to(h, stage.device, stage.ctx.message_dtype if k else None), batch.idx)

    @torch.no_grad()
    def evaluate(self, loader: TensorLoader) -> EvalOutput | None:
        with autocast_of(self.stages):
            return self._evaluate(loader)

    def _evaluate(self, loader: TensorLoader) -> EvalOutput:
        for stage in self.stages:
            stage.train(False)
        labels, logits = [], [[] for _ in self.stages]
        for batch in loader:
            h = batch.x
            for k, stage in enumerate(self.stages):
                h, aux = stage.eval_forward(to(h, stage.device, stage.ctx.message_dtype if k else None))
                logits[k].append(h if k == len(self.stages) - 1 else aux)
            labels.append(batch.y.cpu())
        merged = [None if parts[0] is None else torch.cat([p.float().cpu() for p in parts]) for parts in logits]
        return EvalOutput(torch.cat(labels), merged)

    @property
    def lr(self) -> float:
        return self.stages[-1].lr

    def barrier(self) -> None:
        pass

    def agree(self, value):
        return value

    def gather(self, value) -> list:
        return [value]

    def state_dict(self) -> dict:
        return {"stages": [s.state_dict() for s in self.stages]}

    def load_state_dict(self, state: dict) -> None:
        for stage, s in zip(self.stages, state["stages"], strict=True):
            stage.load_state_dict(s)
