"""Decoupled neural interfaces (Jaderberg et al. 2017): group k < K steps on a synthetic gradient.

A synthesizer predicts dL/dh_k from h_k; the group backpropagates the prediction right away and sends
its own input gradient back, so no group waits. When group k+1's gradient for the batch arrives, the
synthesizer regresses onto it (MSE). Gradients are predicted per sample (scaled by the batch size),
so the synthesizer does not depend on B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lctrun.config import CriticConfig
from lctrun.methods import register
from lctrun.methods.base import Method, Stage, StageContext, StepOut
from lctrun.methods.critics import make_aux_optimizer, make_synthesizer, stashed_forward, step_from_stash


class SynthesizerStage(Stage):
    def __init__(self, group: nn.Module, ctx: StageContext):
        super().__init__(group, ctx)
        if not ctx.last:
            self.aux = make_synthesizer(ctx.out_shape, ctx.cfg.critic.channels).to(ctx.device)
            self.aux_opt = make_aux_optimizer(self.aux.parameters(), ctx.cfg.critic)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> StepOut:
        if self.ctx.last:
            return self.last_group_step(x, y, send_back="grad")
        x_in = x.requires_grad_(not self.ctx.first)
        h = self.group(x_in)
        h_synth = h.detach()
        predicted, stash = stashed_forward(self.aux, h_synth, pipelined=self.wire.depth > 1)
        self.emit(h_synth)
        self.opt.zero_grad(set_to_none=True)
        scale = self.loss_scale()
        h.backward(self.scaled(predicted.detach() / len(h)).to(h.dtype))
        self.optimizer_step()
        self.steps += 1
        self.pending.append((predicted, stash))
        return StepOut(h_synth, self.unscaled(x_in.grad, scale), {})

    def feedback(self, true_grad: torch.Tensor) -> None:
        predicted, stash = self.pending.popleft()
        loss = F.mse_loss(predicted.float(), true_grad.float() * len(true_grad))
        step_from_stash(self.aux, stash, loss, self.aux_opt, self)
        return None


class SyntheticGradients(Method):
    name = "dni"
    description = "decoupled neural interfaces: groups step on synthetic gradients, synthesizers learn the true ones"
    takes_feedback = True
    message = "grad"

    def make_stage(self, group: nn.Module, ctx: StageContext) -> Stage:
        return SynthesizerStage(group, ctx)

    def aux_module(
        self, out_shape: tuple[int, ...], cfg: CriticConfig, num_classes: int, index: int = 0, count: int = 1
    ) -> nn.Module:
        return make_synthesizer(out_shape, cfg.channels)


register(SyntheticGradients())
