"""bp's micro-batches across the K workers under a torch.distributed.pipelining schedule (GPipe or 1F1B).

The schedule moves the activations and gradients of the micro-batches itself. Its message shapes are given,
not inferred: shape inference deadlocks on gloo in torch 2.14 (rank 1 blocks sending metadata during backward
while rank 0 waits for its batch of sends). One schedule per batch size: a smaller last batch gets its own,
with fewer micro-batches where M does not divide it (runtime.base.microbatch_count), and GPipe where that
leaves 1F1B fewer micro-batches than workers (the same update, a different order).
"""

from __future__ import annotations

import math
import time

import torch
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from lctrun.methods import Stage
from lctrun.methods.base import StepOut, classification_metrics, per_sample_loss
from lctrun.runtime.base import microbatch_count
from lctrun.runtime.transport import Channel

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class TimedStage(PipelineStage):
    """A PipelineStage that adds up the seconds of its forward and backward chunks: the worker's compute,
    so that the rest of a step is waiting for (or sending to) its neighbours."""

    compute_s = 0.0

    def _timed(self, run, *args, **kwargs):
        start = time.perf_counter()
        try:
            return run(*args, **kwargs)
        finally:
            self.compute_s += time.perf_counter() - start

    def forward_one_chunk(self, *args, **kwargs):
        return self._timed(super().forward_one_chunk, *args, **kwargs)

    def backward_one_chunk(self, *args, **kwargs):
        return self._timed(super().backward_one_chunk, *args, **kwargs)


def mean_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return per_sample_loss(logits, y).mean()


class AsSent(torch.nn.Module):
    """The group, its output in the dtype and (contiguous) layout the schedule's buffers were made with: the
    library sends and receives a stage's output as given, and its receive buffers are plain contiguous tensors."""

    def __init__(self, group: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.group, self.dtype = group, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group(x).to(self.dtype).contiguous()


class MicrobatchPipeline:
    """One training step of worker `rank`'s bp stage: the schedule's forward and backward of every micro-batch
    (gradients scaled by 1/n, as Stage.begin_microbatch weights them), then the group's one update."""

    def __init__(self, stage: Stage, rank: int, world: int, shapes: tuple, channel: Channel):
        self.stage, self.rank, self.world, self.channel = stage, rank, world, channel
        self.first, self.last = rank == 0, rank == world - 1
        self.in_shape, self.out_shape = shapes
        self.kind, self.microbatches = stage.wire.schedule, stage.wire.microbatches
        self.dtype = stage.wire.dtype  # of the activations and gradients the schedule moves
        self.module = AsSent(stage.group, self.dtype)
        self.schedules: dict[int, tuple] = {}

    def _schedule(self, batch_size: int, in_dtype: torch.dtype):
        if batch_size not in self.schedules:
            n = microbatch_count(batch_size, self.microbatches)
            kind = self.kind if n >= self.world else "gpipe"
            part = batch_size // n
            # requires_grad says which messages carry a gradient back: the activations, not the data
            inputs = torch.empty((part, *self.in_shape), dtype=in_dtype, device="meta", requires_grad=not self.first)
            outputs = torch.empty((part, *self.out_shape), dtype=self.dtype, device="meta", requires_grad=True)
            pstage = TimedStage(
                self.module, self.rank, self.world, self.stage.device, input_args=inputs, output_args=outputs
            )
            # every stage gets the loss: a schedule without one runs forward only
            self.schedules[batch_size] = (SCHEDULES[kind](pstage, n, loss_fn=mean_loss), pstage)
        return self.schedules[batch_size]

    def step(self, x: torch.Tensor | None, y: torch.Tensor) -> StepOut:
        # only worker 1 has the data: the others' inputs arrive as activations in the compute dtype
        schedule, pstage = self._schedule(len(y), x.dtype if x is not None else self.dtype)
        self.stage.zero_grad()
        start, computed = time.perf_counter(), pstage.compute_s
        if self.first:
            logits = schedule.step(x.to(self.stage.device, non_blocking=True), target=y if self.last else None)
        else:
            logits = schedule.step(target=y if self.last else None)
        waited = time.perf_counter() - start - (pstage.compute_s - computed)
        self.stage.update()
        # what the schedule moved, from the shapes and dtype it was given: activations forward, gradients back
        per_sample = math.prod(self.out_shape) * (not self.last) + math.prod(self.in_shape) * (not self.first)
        moved = len(y) * self.dtype.itemsize * per_sample
        self.channel.add_counters({"bytes_sent": moved, "bytes_received": moved, "wait_s": waited})
        if not self.last:
            return StepOut()
        return StepOut(metrics=classification_metrics(logits, y, per_sample_loss(logits.detach(), y)))
