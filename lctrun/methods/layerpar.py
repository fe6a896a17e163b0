"""Penalty and augmented-Lagrangian layer-parallel training, and the serial-parallel hybrid (docs/methods.md section 6).

Auxiliary variables lambda_k stand for the state at boundary k, one per training sample, stored
through the boundary filter (filters.py: D down, U up). Per sample the objective is
    loss(Phi_K(U lambda_{K-1}), y) + sum_k beta/2 ||r_k||^2 + <mu_k, r_k>,   r_k = lambda_k - D Phi_k(U lambda_{k-1})
with mu = 0 for the penalty method. Since beta/2||r||^2 + <mu, r> = beta/2||D Phi_k(U lambda_{k-1}) - t_k||^2 + const
with the target t_k = lambda_k + mu_k/beta, the parameter sub-problem of group k < K is
    minimise  mean over the batch of  beta/2 * ||D Phi_k(U lambda_{k-1}) - t_k||^2  (summed over elements)
and that of the last group is the mean cross-entropy on U lambda_{K-1}: with lambda and mu fixed, the K
sub-problems share nothing. Both are batch means of the per-sample terms of the objective, so near a
consistent lambda the regression's gradient, beta (phi - t), is of the order of the gradient backprop
carries through the boundary (it equals beta/(beta + 1/eta) times it right after a refresh); a mean over
elements without beta would be ~2/(numel (beta + 1/eta)) smaller, and the lower groups would not learn.

Who holds what: stage k+1 owns lambda_k and mu_k (its input) and phi_k = D Phi_k(U lambda_{k-1}) as
group k last computed it for each sample. Stage k keeps nothing per sample for boundary k.

Schedule (our choice, and why). The lambda update for a batch needs g = d(term k+1)/d lambda_k, which
only stage k+1 can compute; stage k's parameter step needs the target that update produces. So within a
batch the *last* group goes first: a parallel step of stage k on the samples idx is
  1. take t_k[idx] from stage k+1 (computed by stage k+1 for this very batch; none for k = K);
  2. one optimiser step on its sub-problem at u = U lambda_{k-1}[idx] (the data for k = 1), with phi_k
     computed before the step; the same backward gives g = d(its term)/d lambda_{k-1};
  3. (k > 1) one linearised proximal step on lambda_{k-1}, with the stored phi_{k-1}:
       lambda <- argmin beta/2||lambda - phi + mu/beta||^2 + <g, lambda> + 1/(2 eta)||lambda - lambda_old||^2
               = (beta phi - mu - g + lambda_old/eta) / (beta + 1/eta)          (eta = layerpar.lambda_lr)
     then, for al, mu <- mu + beta (lambda - phi); the new target lambda + mu/beta, with the beta in
     force now, goes to stage k-1 for its step 1 on this batch;
  4. sends phi_k to stage k+1, which stores it for the next lambda update of these samples.
So a target reaches a parameter update in the same visit: every parallel epoch trains every group, also
the first one after a refresh and with one parallel epoch per SPH cycle, and penalty and al differ
there (al's target moves by mu/beta as well). The price is that the lambda update uses phi_{k-1} as
group k-1 computed it at the previous visit of the samples (after a refresh: exactly the current one).
Per batch one filtered tensor crosses each boundary each way; a worker waits only for the target of the
batch it is about to step, which the worker after it produced earlier (it runs ahead), and takes the
forward messages up to PARALLEL_DEPTH batches late. beta grows geometrically per parallel epoch (the
outer iteration), up to beta_max.

Step size (our choice, and why). Summed over every element of the state, the regression is far stiffer
than backprop's loss (its curvature is beta times the squared Jacobian of the group, and grows as
BatchNorm's running variances shrink): at backprop's learning rate it diverges within a few steps. So a
regression step is SGD at optim.lr, shortened when needed to fit_step times the Polyak step
loss/||grad||^2, the step that would zero the linearised batch loss (the optimum is 0: the targets are
reachable); fit_step = 0.1 leaves room for momentum. Momentum is cleared when the phase changes, since
one phase's direction means nothing for the other's problem. The defaults beta = 0.01 and eta = 100 put
the target about g/(beta + 1/eta) = 50 g from the current state at first, which is what makes the lower
groups learn at a useful rate; beta = 1, eta = 1 gives targets 100x closer and lower groups that barely
move (measured: results/tables/layer-parallel-small and the README).

Auxiliary variables tie each sample to one fixed input, so parallel epochs run without augmentation.
With sph, P parallel epochs alternate with S serial epochs of ordinary model-parallel backprop on
augmented data; before each parallel phase a forward pass over the (unaugmented) training data
refreshes lambda_k = phi_k = D h_k along the chain and mu = 0 (so at the start of a phase every residual
is zero). In parallel phases the groups before a cut run BatchNorm on its running statistics (affine
weights still learn), in the refresh as in their steps: phi_k of a sample must be a function of that
sample alone, since it is regressed onto a per-sample target (with batch statistics, the batch-to-batch
change of phi was 50x the learning signal), and the refresh then leaves the running statistics as they
were. Evaluation always runs the plain model at full resolution.
"""

from __future__ import annotations

import torch
from torch import nn

from lctrun.config import Experiment
from lctrun.methods import register
from lctrun.methods.base import EpochPlan, Method, StageContext, StepOut, Wire, classification_metrics, per_sample_loss
from lctrun.methods.bp import BPStage
from lctrun.methods.filters import BoundaryFilter
from lctrun.models.batchnorm import freeze_batchnorm
from lctrun.precision import DTYPES

PARALLEL_DEPTH = 4  # batches a worker may run ahead in a parallel phase: enough to overlap, bounded buffers


class LayerParallelStage(BPStage):
    def __init__(self, group: nn.Module, ctx: StageContext, multipliers: bool):
        super().__init__(group, ctx)
        lp = ctx.cfg.layerpar
        self.filter = BoundaryFilter(lp.downsample, lp.filter)
        self.multipliers = multipliers
        self.dtype = DTYPES[lp.storage]
        self.eta = lp.lambda_lr
        self.fit_step = lp.fit_step
        self.in_stored = self.filter.shape(ctx.in_shape)  # lambda_{k-1}, mu_{k-1}, phi_{k-1}: as stored and sent
        self.out_stored = self.filter.shape(ctx.out_shape)  # phi_k and t_k
        self.lam = self.mu = self.phi = None  # (N, *in_stored), allocated by the first refresh
        self.target: torch.Tensor | None = None  # t_k for the batch about to be stepped
        self.phase, self.beta = "parallel", lp.beta

    # -- phases ---------------------------------------------------------------------------------
    def begin_epoch(self, plan: EpochPlan) -> None:
        if plan.phase != self.phase:
            self.opt.state.clear()  # momentum of one phase's problem is no direction for the other's
        self.phase, self.beta = plan.phase, plan.beta or self.beta
        ctx = self.ctx
        if self.phase == "serial":  # model-parallel backprop, as bp
            out = None if ctx.last else ctx.out_shape
            self.wire = Wire(ctx.in_shape, out, 1, dtype=ctx.message_dtype, feedback_dtype=ctx.gradient_dtype)
        else:  # phi goes forward in the compute dtype; the target back is a rule's (lambda + mu / beta): fp32
            in_shape = ctx.in_shape if ctx.first else self.in_stored
            depth = max(ctx.cfg.pipeline_depth, PARALLEL_DEPTH)
            out = None if ctx.last else self.out_stored
            self.wire = Wire(in_shape, out, depth, order="backward", dtype=ctx.message_dtype)

    def _storage(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(self.ctx.num_samples, *shape, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def refresh_step(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(self.device)
        if not self.ctx.first:
            if self.lam is None:
                self.lam, self.phi = self._storage(self.in_stored), self._storage(self.in_stored)
                self.mu = self._storage(self.in_stored) if self.multipliers else None
            self.lam[idx] = self.phi[idx] = x.to(self.dtype)
            if self.mu is not None:
                self.mu[idx] = 0
        if self.ctx.last:
            return None
        return self.filter.down(self.group(x if self.ctx.first else self.filter.up(x, self.ctx.in_shape)))

    def train(self, mode: bool = True) -> None:
        super().train(mode)
        if mode and self.phase == "parallel" and not self.ctx.last:
            freeze_batchnorm(self.group)  # phi_s must be a function of sample s alone: it is regressed onto t_s

    # -- training -------------------------------------------------------------------------------
    def feedback(self, msg: torch.Tensor) -> torch.Tensor | None:
        if self.phase == "serial":
            return super().feedback(msg)
        self.target = msg  # t_k for the next batch, from stage k+1 (order="backward": before the step)
        return None

    def store_input(self, msg: torch.Tensor) -> None:
        self.phi[self.pending.popleft()] = msg.to(self.dtype)

    def train_step(self, x: torch.Tensor | None, y: torch.Tensor, idx: torch.Tensor) -> StepOut:
        if self.phase == "serial":
            return super().train_step(x, y, idx)
        idx = idx.to(self.device)
        lam = None if self.ctx.first else self.lam[idx].float().requires_grad_()
        out = self.group(x if self.ctx.first else self.filter.up(lam, self.ctx.in_shape))
        if self.ctx.last:
            phi, losses = None, per_sample_loss(out, y)
            metrics = classification_metrics(out, y, losses)
        else:
            phi, target, self.target = self.filter.down(out), self.target.float(), None
            losses = self.beta / 2 * (phi - target).pow(2).flatten(1).sum(1)
            metrics = {"fit_loss": losses.detach().sum()}
        loss = losses.mean()
        self.opt.zero_grad(set_to_none=True)
        scale = self.loss_scale()
        self.scaled(loss).backward()
        if not self.ctx.last:
            self.scaler.unscale_(self.opt)  # the cap compares the true gradient with the loss (fp16 only)
            self.cap_regression_step(loss)
        self.optimizer_step()
        self.steps += 1
        if self.ctx.first:
            return StepOut(None if phi is None else phi.detach(), None, metrics)
        self.pending.append(idx)  # where group k-1's phi for these samples goes when it arrives
        # the loss is the batch mean of per-sample terms, so d(term of sample s)/d lambda_s = B * lam.grad_s
        residual = self.update_aux(idx, self.phi[idx].float(), self.unscaled(lam.grad, scale) * len(y))
        metrics["residual"] = residual.pow(2).flatten(1).sum(1).sum()
        return StepOut(None if self.ctx.last else phi.detach(), self.target_of(idx), metrics)

    @torch.no_grad()
    def cap_regression_step(self, loss: torch.Tensor) -> None:
        """Shorten the SGD step on the regression to at most fit_step times the Polyak step loss/||grad||^2,
        the step that would zero the linearised batch loss. The targets are reachable (the optimum is 0),
        so a longer step only overshoots them; and the regression, summed over every element of the state,
        is far stiffer than backprop's loss (its curvature grows as BatchNorm's running variances shrink),
        so a fixed lr that suits backprop diverges here. fit_step < 1 leaves room for momentum."""
        grads = [q.grad for q in self.group.parameters() if q.grad is not None]
        polyak = self.fit_step * loss / (sum(g.pow(2).sum() for g in grads) + 1e-20)
        if self.lr > polyak:
            for g in grads:
                g.mul_(polyak / self.lr)

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
        """t_{k-1} = lambda_{k-1} + mu_{k-1}/beta, with the beta in force: what stage k-1 regresses onto now."""
        lam = self.lam[idx].float()
        return lam if self.mu is None else lam + self.mu[idx].float() / self.beta

    # -- bookkeeping ----------------------------------------------------------------------------
    def state_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.lam, self.mu, self.phi) if t is not None]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "lam": self.lam, "mu": self.mu, "phi": self.phi, "phase": self.phase}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.phase = state["phase"]  # begin_epoch clears the momentum when the phase changes, not on a resume
        for key in ("lam", "mu", "phi"):
            value = state[key]
            setattr(self, key, None if value is None else value.to(self.device))


class LayerParallel(Method):
    takes_feedback = True
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
