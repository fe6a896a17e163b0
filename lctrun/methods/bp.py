"""Backprop: end to end on one worker (K=1), or model-parallel across K groups.

Model-parallel bp sends activations forward and gradients backward: group k waits for group k+1's
gradient before it can update (backprop locking). It computes exactly the update of the whole model.

Micro-batched bp (pipeline.microbatches=M) splits each batch into M parts and updates once from their
summed gradients (BatchNorm normalises each part on its own). Across workers, a torch.distributed.pipelining
schedule (pipeline.schedule=gpipe|1f1b, runtime/pipelined.py) runs the parts so that the groups overlap:
the practitioner's pipelined backprop, and the baseline the local methods' speed is measured against.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from lctrun.methods.base import Method, Stage, StageContext, StepOut, Wire


class BPStage(Stage):
    def train_step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> StepOut:
        if self.ctx.last:
            return self.last_group_step(x, y, send_back="grad")
        x_in = x.requires_grad_(not self.ctx.first)
        h = self.group(x_in)
        self.pending.append((x_in, h))
        return StepOut(h.detach(), None, {})

    def feedback(self, grad: torch.Tensor) -> torch.Tensor | None:
        x_in, h = self.pending.popleft()
        self.zero_grad()
        scale = self.loss_scale()
        h.backward(self.scaled(grad).to(h.dtype))  # group k+1's gradient already carries the micro-batch's 1/n
        self.update()
        return self.unscaled(x_in.grad, scale)


class Backprop(Method):
    name = "bp"
    description = "backprop: end to end on one worker, or model-parallel over K groups (gradients flow back)"
    takes_feedback = True
    message = "grad"
    pipelines = False

    def make_stage(self, group: nn.Module, ctx: StageContext) -> Stage:
        return BPStage(group, ctx)

    def wire(self, ctx: StageContext) -> Wire:
        pipe = ctx.cfg.pipeline
        return replace(super().wire(ctx), microbatches=pipe.microbatches, schedule=pipe.schedule)
