"""Data-parallel bp: K replicas of the whole model, each on 1/K of every batch, under DistributedDataParallel.

The strongest backprop a practitioner with K devices runs when the model fits on one: every worker holds the
whole model (one group), reads the same batch, steps on its own part of it, and DDP all-reduces (averages) the
gradients during the backward, bucket by bucket, so that every replica takes the same update. Each replica's
loss gradient is scaled by K n_r / n (n_r: its part of the n samples), so that the average is the whole
batch's mean-loss gradient even when K does not divide n. BatchNorm normalises each part on its own statistics,
as DDP does by default (no SyncBatchNorm): the update is that of one process accumulating the gradients of the
same K micro-batches, which the tests check; DDP broadcasts rank 0's running statistics at every forward.
Evaluation runs on rank 0 alone (every replica holds the same weights); every replica saves its checkpoint.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lctrun.data import TensorLoader
from lctrun.methods import EpochPlan, Method, Stage
from lctrun.runtime.accounting import state_account
from lctrun.runtime.base import EvalOutput, OneStagePerProcess, autocast_of, averages, parameters_of, update_norm
from lctrun.runtime.faults import InjectedFault
from lctrun.runtime.loop import EpochProgress, add_metrics, train_pass
from lctrun.runtime.memory import PeakMemory

STOP_CHECK_EVERY = 8


class ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class DataParallelRuntime(OneStagePerProcess):
    def __init__(self, method: Method, stage: Stage):
        self.method, self.stage, self.stages = method, stage, [stage]
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.needs_inputs = True  # every replica reads the batch and keeps its part
        self.checkpoint_tag = f".rank{self.rank}"
        self.stop_signals = (signal.SIGUSR1,)
        self.fault = InjectedFault.from_env(self.rank)
        self.memory = PeakMemory(stage.device)
        self.account: dict[str, float] = {}
        self.worker_stats: list[dict] = []
        self.module = stage.group
        self.scale = 1.0
        # the scale sits inside DDP, on the model's output, so that DDP averages the scaled gradients
        self.hook = self.module.register_forward_hook(lambda module, args, out: ScaleGrad.apply(out, self.scale))
        device_ids = [stage.device] if stage.device.type == "cuda" else None
        self.replica = DistributedDataParallel(self.module, device_ids=device_ids)
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.module.parameters() if p.requires_grad)

    def close(self) -> None:
        """Let go of the replica before the process group is destroyed: DDP's reducer holds the group, and the
        hook on the plain module (which the prepared run still holds) would keep this runtime, and so the
        replica, alive past destroy_process_group (runtime/distributed.py says what follows)."""
        self.hook.remove()
        self.replica = None

    # -- one training pass (runtime/loop.py runs it) -------------------------------------------------
    def train_epoch(self, loader: TensorLoader, on_batch=None, stop=None, partial=None) -> dict[str, float]:
        return train_pass(self, loader, on_batch, stop, partial)

    def start_params(self) -> list[torch.Tensor]:
        return [parameters_of(self.stage)]

    def begin_pass(self, run: EpochProgress, partial: dict | None) -> None:
        self.stage.train(True)
        self.steps, self.reduce_s = 0, 0.0

    def run_step(self, batch, step: int) -> dict[str, torch.Tensor]:
        n = len(batch.y)
        part = torch.arange(n).tensor_split(self.world)[self.rank]
        x, y, idx = batch.x[part], batch.y[part].to(self.stage.device, non_blocking=True), batch.idx[part]
        self.scale = self.world * len(part) / n
        self.stage.group = self.replica  # the step's forward and backward go through DDP
        try:
            out = self.stage.train_step(x.to(self.stage.device, non_blocking=True), y, idx)
        finally:
            self.stage.group, self.scale = self.module, 1.0
        self.steps += 1
        return out.metrics

    def stops_after(self, step: int, stop, steps: int) -> bool:
        """Rank 0 decides (the launcher asks it) and tells the others, every STOP_CHECK_EVERY steps."""
        if step % STOP_CHECK_EVERY:
            return False
        flag = torch.tensor([bool(stop) and step < steps], dtype=torch.int32, device=self._comm_device)
        dist.broadcast(flag, 0)
        return bool(flag.item())

    @property
    def _comm_device(self) -> torch.device:
        return self.stage.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def end_pass(self, stopped: bool) -> dict:
        return {}

    def group_of(self, key: str) -> int:
        return 1

    def finish_pass(self, run: EpochProgress) -> dict[str, float]:
        """The replicas' sums added up (each saw its part of every batch); every worker's statistics on rank 0."""
        add_metrics(run.total, update_norm(self.stage, run.params[0]))
        for key in sorted(run.total):
            if key != "update_norm":  # the same on every replica
                value = run.total[key].to(self._comm_device, torch.float64)
                dist.all_reduce(value)
                run.total[key] = value
        seconds = run.seconds
        moved = round(2 * (self.world - 1) / self.world * self.param_bytes * self.steps)  # ring all-reduce
        stats = {
            "worker": self.rank,
            "group": "all",
            "device": str(self.stage.device),
            "bytes_sent": moved,
            "bytes_received": moved,
            "wait_s": 0.0,  # the all-reduce overlaps the backward inside DDP: not told apart from compute
            "seconds": round(seconds, 3),
            "compute_s": round(seconds, 3),
            "peak_mem_mb": round(self.memory.peak_bytes() / 2**20, 1),
            **state_account(self.stage),
            **self.account,
        }
        gathered = [None] * self.world if self.is_main else None
        dist.gather_object(stats, gathered, dst=0)
        if not self.is_main:
            return {}
        self.worker_stats = gathered
        return averages(run.total, run.samples)

    def begin_epoch(self, plan: EpochPlan) -> None:
        self.stage.begin_epoch(plan)

    def refresh(self, loader: TensorLoader) -> None:
        raise NotImplementedError("data-parallel bp has no refresh pass")

    @torch.no_grad()
    def evaluate(self, loader: TensorLoader) -> EvalOutput | None:
        if not self.is_main:
            return None
        self.stage.train(False)
        logits, labels = [], []
        for batch in loader:
            with autocast_of(self.stages):
                logits.append(self.module(batch.x.to(self.stage.device)).float().cpu())
            labels.append(batch.y.cpu())
        return EvalOutput(torch.cat(labels), [torch.cat(logits)])
