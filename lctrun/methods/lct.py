"""Local critic training (LCT) and its label-trained cousin DGL (docs/methods.md sections 3 and 4).

Group k < K is trained with the gradient of its own critic's loss, mean(l_k), l_k = CE(c_k(h_k), y);
its input arrives detached, so no gradient ever crosses a group boundary. The last group trains on
the true loss. Critic c_k is trained, with its own optimiser, to match the next loss:
L_ck = mean |l_k - l_{k+1}.detach()| (L1; MSE optional). Per step: the group steps with the
pre-update critic (at train_step), the critic steps when l_{k+1} arrives (at feedback).
critic.target=final is "critic training" (Czarnecki et al. 2017, the ICLR table 1 baseline): every critic
matches the true loss l_K instead, which each group relays to the one before once it arrives, so a group's
backward message waits for its feedback (as bp's does).
Weight decay is the optimiser's own, on every group alike (the official code scaled it, a defect).
"""

from __future__ import annotations

import torch
from torch import nn

from lctrun.config import CriticConfig
from lctrun.methods import register
from lctrun.methods.base import Method, Stage, StageContext, StepOut, classification_metrics, per_sample_loss
from lctrun.methods.critics import (
    critic_depth,
    make_aux_optimizer,
    make_classifier,
    stashed_forward,
    step_from_stash,
)
from lctrun.methods.optim import make_optimizer, make_scheduler


def make_critic(
    out_shape, cfg: CriticConfig, num_classes: int, index: int = 0, count: int = 1, per_step: bool = False
) -> nn.Module:
    """The classifier lct (a critic) and dgl (a head) attach after group `index` of the `count` that get one;
    critic.convs may give each its own depth."""
    depth = critic_depth(cfg, index, count)
    return make_classifier(out_shape, num_classes, depth, cfg.channels, per_step, cfg.pool)


class ClassifierAux:
    """lct and dgl price their cuts with the classifier they attach."""

    def aux_module(
        self, out_shape: tuple[int, ...], cfg: CriticConfig, num_classes: int, index: int = 0, count: int = 1
    ) -> nn.Module:
        return make_critic(out_shape, cfg, num_classes, index, count)


def attach_classifier(stage: Stage, ctx: StageContext) -> nn.Module:
    per_step = getattr(stage.group[-1], "per_step", False)  # language models: a target at every step
    return make_critic(ctx.out_shape, ctx.cfg.critic, ctx.num_classes, ctx.index, ctx.num_groups - 1, per_step).to(
        ctx.device
    )


class CriticStage(Stage):
    def __init__(self, group: nn.Module, ctx: StageContext):
        super().__init__(group, ctx)
        if not ctx.last:
            self.aux = attach_classifier(self, ctx)
            self.aux_opt = make_aux_optimizer(self.aux.parameters(), ctx.cfg.critic)
        self.critic_steps = 0  # feedbacks taken

    def train_step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> StepOut:
        if self.ctx.last:
            return self.last_group_step(x, y, send_back="loss")
        h = self.group(x)
        # The critic runs on a detached copy: its graph is kept (small) until l_{k+1} arrives, while
        # the group's graph is freed right after the group's own update.
        h_critic = h.detach().requires_grad_()
        logits, stash = stashed_forward(self.aux, h_critic, pipelined=self.wire.depth > 1)
        losses = per_sample_loss(logits, y)
        relay = self.ctx.cfg.critic.target == "final"  # l_K is sent on from feedback
        back = None if self.ctx.first or relay else losses.detach()
        self.emit(h_critic.detach(), back)
        (grad_h,) = torch.autograd.grad(self.scaled(losses.mean()), h_critic, retain_graph=True)
        self.opt.zero_grad(set_to_none=True)
        h.backward(grad_h)
        self.optimizer_step()
        self.steps += 1
        self.pending.append((losses, stash))
        return StepOut(h_critic.detach(), back, classification_metrics(logits, y, losses))

    def feedback(self, next_losses: torch.Tensor) -> torch.Tensor | None:
        losses, stash = self.pending.popleft()
        self.critic_steps += 1
        relayed = next_losses.detach() if self.ctx.cfg.critic.target == "final" and not self.ctx.first else None
        if self.critic_steps % self.ctx.cfg.critic.update_every:
            return relayed
        diff = losses - next_losses.detach()
        critic_loss = diff.abs().mean() if self.ctx.cfg.critic.loss == "l1" else diff.pow(2).mean()
        step_from_stash(self.aux, stash, critic_loss, self.aux_opt, self)
        return relayed

    def aux_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.aux(h)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "critic_steps": self.critic_steps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.critic_steps = state["critic_steps"]


class HeadStage(Stage):
    """DGL: the auxiliary head is trained on the labels together with its group, by the main optimiser."""

    def __init__(self, group: nn.Module, ctx: StageContext):
        super().__init__(group, ctx)
        if not ctx.last:
            self.aux = attach_classifier(self, ctx)
            self.opt = make_optimizer([*self.group.parameters(), *self.aux.parameters()], ctx.cfg.optim)
            self.sched = make_scheduler(self.opt, ctx.cfg.optim, ctx.cfg.epochs, ctx.steps_per_epoch)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> StepOut:
        if self.ctx.last:
            return self.last_group_step(x, y, send_back=None)
        h = self.group(x)
        logits = self.aux(h)
        losses = per_sample_loss(logits, y)
        self.emit(h.detach())  # after the head: its forward could change h in place
        self.opt.zero_grad(set_to_none=True)
        self.scaled(losses.mean()).backward()
        self.optimizer_step()
        self.steps += 1
        return StepOut(h.detach(), None, classification_metrics(logits, y, losses))

    def aux_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.aux(h)


class LocalCritic(ClassifierAux, Method):
    name = "lct"
    description = "local critic training: group k learns from critic k, critic k learns to match loss k+1 (cascade)"
    takes_feedback = True
    message = "loss"
    submodels = True

    def make_stage(self, group: nn.Module, ctx: StageContext) -> Stage:
        return CriticStage(group, ctx)


class DecoupledGreedy(ClassifierAux, Method):
    name = "dgl"
    description = "decoupled greedy learning: each group trains with its own auxiliary head on the labels"
    takes_feedback = False
    submodels = True

    def make_stage(self, group: nn.Module, ctx: StageContext) -> Stage:
        return HeadStage(group, ctx)


register(LocalCritic())
register(DecoupledGreedy())
