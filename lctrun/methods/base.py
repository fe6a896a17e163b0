"""The interface between a training method and a runtime.

A method is written once, per layer group, as a `Stage`: the group, the method's auxiliary modules
for it (critic, head, synthesizer) and their optimisers. A runtime (one process, or one process per
group) moves messages between stages and decides when each stage runs; a stage never knows which.

One training step of stage k:
    out = stage.train_step(x, y, idx)   # x: input of the group (data, or group k-1's forward message)
    out.forward   -> the input of group k+1 (None for the last group)
    out.backward  -> message for group k-1, if it is ready now (None if it must wait for feedback)
    stage.feedback(msg)                  # msg: group k+1's backward message for this batch
                                         # (only called when stage.wire.feedback_shape is set); returns
                                         # group k's own backward message if it was deferred (bp)
Feedback for a batch arrives in the order the batches were stepped. `stage.wire` tells the runtime
the shapes of the messages the stage receives and how far it may run ahead; a method whose messages
change between epochs (the serial-parallel hybrid) changes it in `begin_epoch`.

A wire with order="backward" reverses who goes first (the parallel phases of the layer-parallel
methods, whose groups read their inputs from stored auxiliary variables): group k+1 steps a batch
before group k, so the runtime calls `stage.feedback(msg)` with group k+1's message for a batch
*before* `stage.train_step(x, y, idx)` of that batch (x: the data for group 1, None otherwise), and
hands group k-1's forward message for the batch to `stage.store_input(msg)` afterwards, up to
`wire.depth` batches later, in the order the batches were stepped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lctrun.config import CriticConfig, Experiment, LayerParallelConfig, OptimConfig, PipelineConfig
from lctrun.methods.optim import make_optimizer, make_scheduler
from lctrun.precision import compute_dtype


@dataclass
class StepOut:
    forward: torch.Tensor | None = None
    backward: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # sums over the batch


@dataclass(frozen=True)
class Wire:
    """What a stage receives, per sample, and how many batches it may run ahead of its feedback."""

    in_shape: tuple[int, ...]  # the forward message from group k-1 (the data for group 1)
    feedback_shape: tuple[int, ...] | None  # the backward message from group k+1; None: no feedback
    depth: int  # batches in flight before the stage must take the oldest batch's feedback
    order: str = "forward"  # forward: group k steps a batch first; backward: group k+1 does (see above)
    microbatches: int = 1  # bp: train_step runs per micro-batch, one update per batch (Stage.begin_microbatch)
    schedule: str = "none"  # bp: the torch.distributed.pipelining schedule of the micro-batches across workers
    # what the messages travel in, both ways across a cut: activations and gradients in the compute dtype
    # (lctrun.precision), a loss or a rule's target in fp32
    dtype: torch.dtype = torch.float32  # the forward messages (activations)
    feedback_dtype: torch.dtype = torch.float32  # the backward messages


@dataclass(frozen=True)
class EpochPlan:
    """What an epoch does, the same for every stage: its phase, augmentation, and a refresh pass first."""

    phase: str = "train"  # train | parallel | serial (layer-parallel methods)
    augment: bool = True
    refresh: bool = False  # run stage.refresh_step over the training data before the epoch
    beta: float | None = None  # layer-parallel methods: the penalty weight of this epoch


@dataclass(frozen=True)
class StageSettings:
    """The part of an Experiment a stage reads: how its group learns and its method's own options."""

    optim: OptimConfig
    epochs: int  # the lr schedule's length
    pipeline_depth: int
    critic: CriticConfig  # lct, dgl, dni
    layerpar: LayerParallelConfig  # penalty, al
    pipeline: PipelineConfig  # bp

    @classmethod
    def of(cls, cfg: Experiment) -> StageSettings:
        return cls(cfg.optim, cfg.epochs, cfg.pipeline_depth, cfg.critic, cfg.layerpar, cfg.pipeline)


@dataclass
class StageContext:
    cfg: StageSettings
    index: int  # k, from 0
    num_groups: int  # K
    num_classes: int
    in_shape: tuple[int, ...]  # per-sample shape of the group's input
    out_shape: tuple[int, ...]  # per-sample shape of the group's output
    device: torch.device
    steps_per_epoch: int = 1
    num_samples: int = 0  # training samples (methods with per-sample state size it by this)
    precision: str = "fp32"  # the compute precision of the stage's forwards (lctrun.precision)

    @property
    def message_dtype(self) -> torch.dtype:
        """Activations (and, but under fp16, their gradients) cross a cut in the compute dtype."""
        return compute_dtype(self.precision)

    @property
    def gradient_dtype(self) -> torch.dtype:
        """Gradients across a cut: in the compute dtype, except under fp16, where a gradient without this
        worker's loss scale (each worker has its own) would underflow, so it travels unscaled in fp32."""
        return torch.float32 if self.precision == "fp16" else self.message_dtype

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.num_groups - 1


def per_sample_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample, shape (B,), in fp32 whatever the compute precision (the losses a rule compares).
    Sequence outputs (B, T, C) with targets (B, T): mean over T."""
    logits = logits.float()
    if logits.dim() == 3:
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)
    return F.cross_entropy(logits, y, reduction="none")


def correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correct predictions summed over the batch (sequences: the fraction of correct tokens per sample)."""
    hits = (logits.detach().argmax(-1) == y).float()
    return hits.mean(1).sum() if hits.dim() == 2 else hits.sum()


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, losses: torch.Tensor, prefix: str = ""):
    return {f"{prefix}loss": losses.detach().sum(), f"{prefix}correct": correct(logits, y)}


class Stage:
    """Default stage: the group trained on the classification loss when last, else nothing local."""

    aux: nn.Module | None = None  # critic / head / synthesizer, owned by this stage
    wire: Wire  # set by build_stage from the method; begin_epoch may change it
    # set by a runtime that moves messages between processes: called with a step's messages as soon as they are
    # final, before the step ends (see emit)
    ready: Callable[[torch.Tensor | None, torch.Tensor | None], None] | None = None

    def __init__(self, group: nn.Module, ctx: StageContext):
        self.ctx = ctx
        self.device = ctx.device
        self.group = group.to(ctx.device)
        self.opt = make_optimizer(self.group.parameters(), ctx.cfg.optim)
        self.sched = make_scheduler(self.opt, ctx.cfg.optim, ctx.cfg.epochs, ctx.steps_per_epoch)
        # fp16 only: this worker's dynamic loss scale, for every backward it runs (its group's and its auxiliary
        # net's); a no-op otherwise. Gradients leave and enter a stage unscaled (scaled, unscaled).
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.precision == "fp16")
        self.pending: deque = deque()  # per-batch state kept until that batch's feedback arrives
        self.steps = 0
        self.microbatch, self.microbatches = 0, 1  # which part of the batch the next train_step is

    def begin_microbatch(self, i: int, n: int) -> None:
        """The next train_step (and its feedback) is micro-batch i of n of one batch: the gradients of the n
        add up (each loss weighted 1/n, so the sum is the batch's mean-loss gradient) and the group updates once,
        after the last."""
        self.microbatch, self.microbatches = i, n

    def zero_grad(self) -> None:
        if self.microbatch == 0:
            self.opt.zero_grad(set_to_none=True)

    # -- loss scaling (fp16) ------------------------------------------------------------------------
    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """A loss (or a received gradient) times this worker's loss scale; unchanged but under fp16."""
        return self.scaler.scale(loss)

    def loss_scale(self) -> float:
        """The scale the next backward runs with (1 but under fp16): read before an update may change it."""
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    def unscaled(self, grad: torch.Tensor | None, scale: float) -> torch.Tensor | None:
        """An input gradient computed under `scale`, as the previous group must receive it."""
        return grad if grad is None or scale == 1.0 else grad.float() / scale

    def update(self) -> None:
        """Step the group (its optimiser and schedule) once the batch's last micro-batch is in."""
        if self.microbatch == self.microbatches - 1:
            self.optimizer_step()
            self.steps += 1

    # -- training -------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> StepOut:
        raise NotImplementedError

    def feedback(self, msg: torch.Tensor | None) -> torch.Tensor | None:
        return None

    def emit(self, forward: torch.Tensor | None = None, backward: torch.Tensor | None = None) -> None:
        """This step's forward and/or backward message is final before the step has ended (a local method's
        output once its auxiliary forward has run): the runtime may send it now, so that the neighbour starts
        while this group still computes its update. The step still returns it in its StepOut."""
        if self.ready is not None:
            self.ready(forward, backward)

    def store_input(self, msg: torch.Tensor) -> None:
        """order="backward" only: group k-1's forward message for the oldest batch still owed one."""
        raise NotImplementedError(f"{type(self).__name__} has no wire with order='backward'")

    def last_group_step(self, x: torch.Tensor, y: torch.Tensor, send_back: str | None) -> StepOut:
        """The last group: ordinary backprop on the true loss. `send_back`: grad | loss | None."""
        x_in = x.requires_grad_(send_back == "grad" and not self.ctx.first)
        logits = self.group(x_in)
        losses = per_sample_loss(logits, y)
        if send_back == "loss" and not self.ctx.first:
            self.emit(backward=losses.detach())
        self.zero_grad()
        scale = self.loss_scale()
        self.scaled(losses.mean() / self.microbatches).backward()  # / 1 is exact: unchanged without micro-batches
        self.update()
        back = {"grad": self.unscaled(x_in.grad, scale), "loss": losses.detach(), None: None}[send_back]
        metrics = classification_metrics(logits, y, losses)
        return StepOut(None, None if self.ctx.first else back, metrics)

    def optimizer_step(self) -> None:
        """Step the group's optimiser and its schedule (the auxiliary optimisers have none). Under fp16 the
        scaler unscales the gradients first and skips the step if any is inf/NaN (then lowers the scale)."""
        self.step_with_scaler(self.opt)
        self.sched.step()

    def step_with_scaler(self, opt: torch.optim.Optimizer) -> None:
        self.scaler.step(opt)
        self.scaler.update()

    def begin_epoch(self, plan: EpochPlan) -> None:
        """Called before each epoch (and before its refresh pass)."""

    @torch.no_grad()
    def refresh_step(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
        """A forward pass without learning, for methods that store per-sample state (plan.refresh)."""
        return self.group(x)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def eval_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(group output, sub-model logits from the auxiliary module or None)."""
        h = self.group(x)
        logits = self.aux_logits(h) if self.aux is not None and not self.ctx.last else None
        return h, logits

    def aux_logits(self, h: torch.Tensor) -> torch.Tensor | None:
        return None

    def train(self, mode: bool = True) -> None:
        self.group.train(mode)
        if self.aux is not None:
            self.aux.train(mode)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "group": self.group.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
        }
        state["steps"] = self.steps
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        if self.aux is not None:
            state["aux"] = self.aux.state_dict()
            if getattr(self, "aux_opt", None) is not None:
                state["aux_opt"] = self.aux_opt.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.group.load_state_dict(state["group"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.steps = state["steps"]
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.aux is not None:
            self.aux.load_state_dict(state["aux"])
            if "aux_opt" in state:
                self.aux_opt.load_state_dict(state["aux_opt"])

    def state_tensors(self) -> list[torch.Tensor]:
        """Per-sample state the method keeps besides modules and optimisers (auxiliary variables)."""
        return []

    def modules(self) -> list[nn.Module]:
        return [self.group] + ([self.aux] if self.aux is not None else [])


class Method:
    """A training method: how each group's stage is built, and whether stages wait for feedback."""

    name: str = ""
    description: str = ""
    takes_feedback: bool = False  # groups k < K consume a backward message from group k+1
    message: str | None = None  # what that message is: "grad" (dL/dh_k) or "loss" (per-sample, B floats)
    pipelines: bool = True  # may run ahead across mini-batches (bp may not: it would use stale weights)
    submodels: bool = False  # stages k < K have classifiers of their own (sub-models)

    def make_stage(self, group: nn.Module, ctx: StageContext) -> Stage:
        raise NotImplementedError

    def wire(self, ctx: StageContext) -> Wire:
        """The messages every stage of this method receives, from the method's flags."""
        feedback = None
        if self.takes_feedback and not ctx.last:
            feedback = () if self.message == "loss" else ctx.out_shape
        depth = ctx.cfg.pipeline_depth if self.pipelines else 1
        back = ctx.gradient_dtype if self.message == "grad" else torch.float32
        return Wire(ctx.in_shape, feedback, depth, dtype=ctx.message_dtype, feedback_dtype=back)

    def plan(self, cfg: Experiment, epoch: int) -> EpochPlan:
        """What epoch `epoch` (from 1) does; the same every epoch unless a method has phases."""
        return EpochPlan(augment=cfg.data.augment)

    def aux_module(
        self, out_shape: tuple[int, ...], cfg: CriticConfig, num_classes: int, index: int = 0, count: int = 1
    ) -> nn.Module | None:
        """The module this method attaches after group `index` (of `count` that get one) with this output
        shape: what a balanced cut prices, and what the stage builds."""
        return None
