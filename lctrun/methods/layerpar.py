"""Penalty and augmented-Lagrangian layer-parallel training, and the serial-parallel hybrid (METHODS.md s.4).

Auxiliary variables lambda_k stand for the state at boundary k, one per training sample, stored
through the boundary filter (filters.py: D down, U up). Per sample the objective is
    loss(Phi_K(U lambda_{K-1}), y) + sum_k beta/2 ||r_k||^2 + <mu_k, r_k>,   r_k = lambda_k - D Phi_k(U lambda_{k-1})
with mu = 0 for the penalty method. Since beta/2||r||^2 + <mu, r> = beta/2||D Phi_k(U lambda_{k-1}) - t_k||^2 + const
with the target t_k = lambda_k + mu_k/beta, the parameter sub-problem of group k < K is a regression onto
t_k, and that of the last group is the classification loss on U lambda_{K-1}: with lambda and mu fixed,
the K sub-problems share nothing. Each is solved by one optimiser step per batch on its own scale (mean
squared error, or cross-entropy): beta weighs the auxiliary-variable update only (our choice).

Who holds what: stage k+1 owns lambda_k and mu_k (its input); stage k keeps only its target t_k.
A parallel step of stage k on the samples idx:
  1. one optimiser step on its sub-problem at u = U lambda_{k-1}[idx] (the data for k = 1); the same
     backward gives g = d(its term)/d lambda_{k-1}, the neighbour information for the lambda update;
  2. sends phi_k = D Phi_k(u) (taken before the step) to stage k+1, which needs it for r_k;
  3. on phi_{k-1} from stage k-1: one linearised proximal step on lambda_{k-1} (our choice),
       lambda <- argmin beta/2||lambda - phi + mu/beta||^2 + <g, lambda> + 1/(2 eta)||lambda - lambda_old||^2
               = (beta phi - mu - g + lambda_old/eta) / (beta + 1/eta)          (eta = layerpar.lambda_lr)
     then, for al, mu <- mu + beta (lambda - phi); and sends the new target lambda + mu/beta back to
     stage k-1, which stores it for the next time it meets these samples.
So per batch one filtered tensor crosses each boundary each way, and nobody waits for it: a target is
used an epoch later. beta grows geometrically per parallel epoch (the outer iteration), up to beta_max.

Auxiliary variables tie each sample to one fixed input, so parallel epochs run without augmentation.
With sph, P parallel epochs alternate with S serial epochs of ordinary model-parallel backprop on
augmented data; before each parallel phase a forward pass over the (unaugmented) training data
refreshes lambda_k = D h_k along the chain, the targets to match, and mu = 0 (so at the start of a
phase every residual is zero). Evaluation always runs the plain model at full resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lctrun.config import Experiment
from lctrun.methods import register
from lctrun.methods.base import EpochPlan, Method, StageContext, StepOut, Wire, classification_metrics, per_sample_loss
from lctrun.methods.bp import BPStage
from lctrun.methods.filters import BoundaryFilter

STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PARALLEL_DEPTH = 4  # batches a worker may run ahead in a parallel phase: enough to overlap, bounded buffers


class LayerParallelStage(BPStage):
    def __init__(self, group: nn.Module, ctx: StageContext, multipliers: bool):
        super().__init__(group, ctx)
        lp = ctx.cfg.layerpar
        self.filter = BoundaryFilter(lp.downsample, lp.filter)
        self.multipliers = multipliers
        self.dtype = STORAGE[lp.precision]
        self.eta = lp.lambda_lr
        self.in_stored = self.filter.shape(ctx.in_shape)  # lambda_{k-1}, as stored and sent
        self.out_stored = self.filter.shape(ctx.out_shape)  # phi_k and t_k
        self.lam = self.mu = self.target = None  # (N, *shape), allocated by the first refresh
        self.phase, self.beta = "parallel", lp.beta

    # -- phases ---------------------------------------------------------------------------------
    def begin_epoch(self, plan: EpochPlan) -> None:
        self.phase, self.beta = plan.phase, plan.beta or self.beta
        ctx = self.ctx
        if self.phase == "serial":  # model-parallel backprop, as bp
            self.wire = Wire(ctx.in_shape, None if ctx.last else ctx.out_shape, 1)
        else:
            in_shape = ctx.in_shape if ctx.first else self.in_stored
            depth = max(ctx.cfg.pipeline_depth, PARALLEL_DEPTH)
            self.wire = Wire(in_shape, None if ctx.last else self.out_stored, depth)

    def _storage(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(self.ctx.num_samples, *shape, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def refresh_step(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(self.device)
        if not self.ctx.first:
            if self.lam is None:
                self.lam = self._storage(self.in_stored)
                self.mu = self._storage(self.in_stored) if self.multipliers else None
            self.lam[idx] = x.to(self.dtype)
            if self.mu is not None:
                self.mu[idx] = 0
        if self.ctx.last:
            return None
        phi = self.filter.down(self.group(x if self.ctx.first else self.filter.up(x, self.ctx.in_shape)))
        if self.target is None:
            self.target = self._storage(self.out_stored)
        self.target[idx] = phi.to(self.dtype)
        return phi

    # -- training -------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> StepOut:
        if self.phase == "serial":
            return super().train_step(x, y, idx)
        idx = idx.to(self.device)
        lam = None if self.ctx.first else self.lam[idx].float().requires_grad_()
        u = x if self.ctx.first else self.filter.up(lam, self.ctx.in_shape)
        out = self.group(u)
        phi = self.filter.down(out)
        if self.ctx.last:
            losses = per_sample_loss(out, y)
            loss = losses.mean()
            metrics = classification_metrics(out, y, losses)
        else:
            loss = F.mse_loss(phi, self.target[idx].float())
            metrics = {"fit_loss": loss.detach() * len(y)}
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer_step()
        self.steps += 1
        if not self.ctx.last:
            self.pending.append(idx)  # where group k+1's new targets for these samples go
        if self.ctx.first:
            return StepOut(phi.detach(), None, metrics)
        # d(term of sample s)/d lambda_s from the batch-mean loss: CE is the term itself; the regression's
        # term is beta/2 * sum of squares, while the loss is the mean over batch and elements.
        scale = len(y) if self.ctx.last else len(y) * self.beta * phi[0].numel() / 2
        residual = self.update_aux(idx, x, lam.grad * scale)
        metrics["residual"] = residual.pow(2).flatten(1).sum(1).sum()
        return StepOut(None if self.ctx.last else phi.detach(), self.target_of(idx), metrics)

    @torch.no_grad()
    def update_aux(self, idx: torch.Tensor, phi: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The proximal lambda step and (al) the multiplier step for the samples idx; returns the residual."""
        beta, eta = self.beta, self.eta
        lam_old = self.lam[idx].float()
        mu = self.mu[idx].float() if self.mu is not None else torch.zeros_like(lam_old)
        lam = (beta * phi - mu - g + lam_old / eta) / (beta + 1 / eta)
        residual = lam - phi
        self.lam[idx] = lam.to(self.dtype)
        if self.mu is not None:
            self.mu[idx] = (mu + beta * residual).to(self.dtype)
        return residual

    def target_of(self, idx: torch.Tensor) -> torch.Tensor:
        """t_{k-1} = lambda_{k-1} + mu_{k-1}/beta, what stage k-1 regresses onto."""
        lam = self.lam[idx].float()
        return lam if self.mu is None else lam + self.mu[idx].float() / self.beta

    def feedback(self, msg: torch.Tensor) -> torch.Tensor | None:
        if self.phase == "serial":
            return super().feedback(msg)
        self.target[self.pending.popleft()] = msg.to(self.dtype)
        return None

    # -- bookkeeping ----------------------------------------------------------------------------
    def state_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.lam, self.mu, self.target) if t is not None]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "lam": self.lam, "mu": self.mu, "target": self.target}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for key in ("lam", "mu", "target"):
            value = state[key]
            setattr(self, key, None if value is None else value.to(self.device))


class LayerParallel(Method):
    feedback = True
    message = "grad"
    pipelines = False
    multipliers = False

    def make_stage(self, group: nn.Module, ctx: StageContext) -> LayerParallelStage:
        return LayerParallelStage(group, ctx, self.multipliers)

    def wire(self, ctx: StageContext) -> Wire:
        return Wire(ctx.in_shape, None, 1)  # set per epoch by begin_epoch

    def plan(self, cfg: Experiment, epoch: int) -> EpochPlan:
        lp = cfg.layerpar
        phases = schedule(lp.parallel_epochs, lp.serial_epochs, epoch) if lp.sph else ["parallel"] * epoch
        phase = phases[-1]
        if phase == "serial":
            return EpochPlan("serial", augment=cfg.data.augment is not False)
        done = phases[:-1].count("parallel")
        beta = min(lp.beta * lp.beta_growth**done, lp.beta_max)
        refresh = epoch == 1 or phases[-2] == "serial"
        return EpochPlan("parallel", augment=False, refresh=refresh, beta=beta)


def schedule(parallel_epochs: int, serial_epochs: int, epochs: int) -> list[str]:
    """The phase of every epoch 1..epochs: cycles of parallel epochs, then serial epochs."""
    cycle = ["parallel"] * parallel_epochs + ["serial"] * serial_epochs
    return [cycle[e % len(cycle)] for e in range(epochs)]


class Penalty(LayerParallel):
    name = "penalty"
    description = (
        "penalty ADMM: auxiliary variables per sample at each cut; groups solve independent sub-problems in "
        "parallel, alternating with auxiliary-variable updates (beta grows); sph, downsampling filters"
    )


class AugmentedLagrangian(LayerParallel):
    name = "al"
    description = (
        "augmented Lagrangian (ADMM-style alternating updates): penalty plus multipliers "
        "mu += beta * residual; sph, downsampling filters"
    )
    multipliers = True


register(Penalty())
register(AugmentedLagrangian())
