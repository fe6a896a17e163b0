"""One process per layer group over torch.distributed: gloo on CPU, NCCL on distinct CUDA devices.

`lctrun train ... runtime=distributed` spawns the K local workers itself; under
`torchrun --nproc_per_node ... -m lctrun train ...` each process reads RANK/WORLD_SIZE/LOCAL_RANK.
Worker k holds stage k only. Per batch it receives its input from worker k-1, steps, sends its
output to worker k+1 and its backward message to worker k-1. With pipeline_depth D it runs ahead up
to D batches before it must take group k+1's feedback for the oldest one (D=1: synchronous, the same
updates as the serial runtime). Methods that defer their backward message (bp) always run with D=1.
With a wire of order "backward" (the parallel phases of penalty/al) worker k+1 leads instead: worker k
takes worker k+1's message for a batch before stepping it, and worker k-1's forward message for it up to
D batches later, so worker k runs up to D batches ahead of worker k-1 and nobody waits for a round trip.
The stage's `wire` gives the message shapes, D and the order for the epoch (they change between SPH phases).
"""

from __future__ import annotations

import gc
import os
import signal
from collections import deque
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

# Imported before any process group exists: its functions take group.WORLD as a default argument when
# the module is first imported. Imported later (torch._dynamo pulls it in lazily), they would pin the
# process group, so destroy_process_group could not join gloo's threads, and one of them could free a
# tensor while the interpreter shuts down: the worker then aborts ("terminate called without an active
# exception") after its work is done.
import torch.distributed.nn  # noqa: F401, I001
from rich.console import Console

from lctrun.config import Experiment
from lctrun.data import TensorLoader
from lctrun.errors import ConfigError
from lctrun.methods import EpochPlan, Method, Stage, build_stage
from lctrun.models.chain import group_split_names
from lctrun.prepared import group_devices, prepare
from lctrun.runtime.accounting import state_account
from lctrun.runtime.base import (
    EvalOutput,
    OneStagePerProcess,
    autocast_of,
    averages,
    parameters_of,
    stage_prefix,
    update_norm,
)
from lctrun.runtime.faults import InjectedFault
from lctrun.runtime.loop import EpochProgress, add_metrics, train_pass
from lctrun.runtime.memory import PeakMemory
from lctrun.runtime.processes import run_processes
from lctrun.runtime.transport import BACKWARD, EVAL, FORWARD, Channel

STOP_CHECK_EVERY = 8


class DistributedRuntime(OneStagePerProcess):
    def __init__(self, method: Method, stage: Stage, shapes: list, channels_last: bool = False):
        self.method, self.stage, self.stages = method, stage, [stage]
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.needs_inputs = self.rank == 0  # the other workers receive their inputs
        self.first, self.last = self.rank == 0, self.rank == self.world - 1
        self.in_shape = shapes[self.rank][0]  # evaluation messages: the plain model's states
        self.activations = stage.ctx.message_dtype  # what evaluation and refresh messages travel in
        self.channel = Channel(stage.device, channels_last=channels_last)
        self.memory = PeakMemory(stage.device)
        self.account: dict[str, float] = {}
        self.worker_stats: list[dict] = []
        self.checkpoint_tag = f".rank{self.rank}"  # one checkpoint file per worker
        self.stop_signals = (signal.SIGUSR1,)  # from the launcher; SIGTERM still ends a worker at once
        self.fault = InjectedFault.from_env(self.rank)
        self.early = [False, False]  # this step's forward / backward message went out before the step ended
        stage.ready = self._send_now
        self.pipeline = None  # bp under a micro-batch schedule: the schedule moves the step's messages
        if stage.wire.schedule != "none":
            from lctrun.runtime.pipelined import MicrobatchPipeline  # torch.distributed.pipelining loads slowly

            self.pipeline = MicrobatchPipeline(stage, self.rank, self.world, shapes[self.rank], self.channel)

    # -- training -------------------------------------------------------------------------------
    def _input(self, batch, tag: int, shape: tuple[int, ...]) -> torch.Tensor:
        if self.first:
            return batch.x
        return self.channel.recv((len(batch.y), *shape), self.rank - 1, tag, self.activations)

    def _step_input(self, batch, step: int) -> torch.Tensor:
        """The input of training step `step`, with the receive of the next step's posted first, so that its
        transfer overlaps this step's compute. Never past a step where the pass may stop (a stop question):
        the sender would stop too, and the posted receive would never complete."""
        if self.first:
            return batch.x
        wire, loader = self.stage.wire, self.loader
        shape = wire.in_shape
        posted = self.ahead or self.channel.post((len(batch.y), *shape), self.rank - 1, FORWARD, wire.dtype)
        self.ahead = None
        if step < len(loader) and step % STOP_CHECK_EVERY:
            self.ahead = self.channel.post((loader.batch_len(step + 1), *shape), self.rank - 1, FORWARD, wire.dtype)
        return self.channel.take(posted)

    def _take_feedback(self, batch_size: int) -> None:
        wire = self.stage.wire
        shape = (batch_size, *wire.feedback_shape)
        deferred = self.stage.feedback(self.channel.recv(shape, self.rank + 1, BACKWARD, wire.feedback_dtype))
        if deferred is not None and not self.first:
            self.channel.send(deferred, self.rank - 1, BACKWARD, wire.feedback_dtype)

    def _stops_after(self, step: int, stop, steps: int) -> bool:
        """Whether every worker ends the epoch after `step`: rank 0 decides (it is the one the launcher
        asks to stop) and the decision travels down the chain with the activations. Asked every
        STOP_CHECK_EVERY steps only: each question is a message (a few % of a small model's step)."""
        if step % STOP_CHECK_EVERY:
            return False
        stops = bool(stop) and step < steps if self.first else self.channel.recv_flag(self.rank - 1)
        if not self.last:
            self.channel.send_flag(stops, self.rank + 1)
        return stops

    def _store_input(self, batch_size: int) -> None:
        wire = self.stage.wire
        self.stage.store_input(self.channel.recv((batch_size, *wire.in_shape), self.rank - 1, FORWARD, wire.dtype))

    def _stops_after_last_first(self, step: int, stop, steps: int, depth: int) -> bool:
        """_stops_after for order="backward", where worker k runs up to k * depth steps ahead of worker 0:
        rank 0 asks at step s and sends the answer to every worker; all stop after step s + (K-1) depth.
        Worker k reads the answer after its step s + k depth, so nobody waits for it; once the answer is yes,
        nobody asks again."""
        margin = (self.world - 1) * depth
        asked = step - self.rank * depth
        if (
            self.stop_at is None
            and asked >= self.first_step
            and asked % STOP_CHECK_EVERY == 0
            and asked + margin < steps
        ):
            if self.first:
                stops = bool(stop)
                for rank in range(1, self.world):
                    self.channel.send_flag(stops, rank)
            else:
                stops = self.channel.recv_flag(0)
            if stops:
                self.stop_at = asked + margin
        return self.stop_at == step

    # -- one training pass (runtime/loop.py runs it) -------------------------------------------------
    def train_epoch(self, loader: TensorLoader, on_batch=None, stop=None, partial=None) -> dict[str, float]:
        """One pass over `loader`; `partial` continues a pass that `stop` ended early (an EpochInterrupted's).

        A stop drains the pipeline like an epoch end, so with pipeline depth > 1 the resumed run equals an
        uninterrupted one only up to where the feedback of the last steps is applied."""
        return train_pass(self, loader, on_batch, stop, partial)

    def start_params(self) -> list[torch.Tensor]:
        return [parameters_of(self.stage)]

    def begin_pass(self, run: EpochProgress, partial: dict | None) -> None:
        self.stage.train(True)
        wire = self.stage.wire
        self.last_first = wire.order == "backward"
        # batch sizes still owed a message: feedback from worker k+1, or (last_first) worker k-1's forward one
        self.waiting: deque[int] = deque()
        if self.last_first:
            self.owed, self.settle, self.lag = not self.first, self._store_input, wire.depth
        else:  # lag: batches that may stay owed after a step
            self.owed, self.settle, self.lag = (
                wire.feedback_shape is not None and not self.pipeline,
                self._take_feedback,
                wire.depth - 1,
            )
        self.stop_at, self.first_step = None, run.first_step  # a resumed pass asks from here on, on every worker
        self.loader, self.ahead = run.loader, None  # ahead: the next step's input, its receive posted
        if partial and "counters" in partial:  # the traffic and waiting before the stop belong to this row too
            self.channel.add_counters(partial["counters"])

    def run_step(self, batch, step: int) -> dict[str, torch.Tensor]:
        """Take this worker's input (or, last_first, its feedback), step, send both ways, settle what is owed."""
        wire = self.stage.wire
        if self.last_first:
            if not self.last:
                shape = (len(batch.y), *wire.feedback_shape)
                target = self.channel.recv(shape, self.rank + 1, BACKWARD, wire.feedback_dtype)
                self.stage.feedback(target)
            x = batch.x if self.first else None
        elif self.pipeline:
            x = batch.x if self.first else None
        else:
            x = self._step_input(batch, step)
        y = batch.y.to(self.stage.device, non_blocking=True)
        self.early = [False, False]
        out = self.pipeline.step(x, y) if self.pipeline else self.stage.train_step(x, y, batch.idx)
        if out.backward is not None and not self.first and not self.early[1]:
            self.channel.send(out.backward, self.rank - 1, BACKWARD, wire.feedback_dtype)
        if not self.last and not self.pipeline and not self.early[0]:
            self.channel.send(out.forward, self.rank + 1, FORWARD, wire.dtype)
        if self.owed:
            self.waiting.append(len(batch.y))
            while len(self.waiting) > self.lag:
                self.settle(self.waiting.popleft())
        return out.metrics

    def _send_now(self, forward: torch.Tensor | None, backward: torch.Tensor | None) -> None:
        """Stage.emit: send a message before the step ends. Without it, at pipeline depth 1 group k+1 waited for
        group k's whole step (update included) and the two never overlapped."""
        wire = self.stage.wire
        if forward is not None and not self.last:
            self.channel.send(forward, self.rank + 1, FORWARD, wire.dtype)
            self.early[0] = True
        if backward is not None and not self.first:
            self.channel.send(backward, self.rank - 1, BACKWARD, wire.feedback_dtype)
            self.early[1] = True

    def stops_after(self, step: int, stop, steps: int) -> bool:
        if self.last_first:
            return self._stops_after_last_first(step, stop, steps, self.stage.wire.depth)
        return self._stops_after(step, stop, steps)

    def end_pass(self, stopped: bool) -> dict:
        while self.waiting:
            self.settle(self.waiting.popleft())
        self.channel.flush()
        return {"counters": self.channel.take_counters()} if stopped else {}

    def group_of(self, key: str) -> int:
        return self.rank + 1

    def finish_pass(self, run: EpochProgress) -> dict[str, float]:
        """This worker's statistics, and every worker's sums gathered and merged on the main one."""
        add_metrics(run.total, update_norm(self.stage, run.params[0]))
        seconds = run.seconds
        stats = {
            "worker": self.rank,
            "group": self.rank + 1,
            "device": str(self.stage.device),
            **self.channel.take_counters(),
            "seconds": round(seconds, 3),
            "peak_mem_mb": round(self.memory.peak_bytes() / 2**20, 1),
            **state_account(self.stage),
            **self.account,
        }
        stats["compute_s"] = round(seconds - stats["wait_s"], 3)
        total = {key: value.cpu() for key, value in run.total.items()}
        gathered = [None] * self.world if self.is_main else None
        dist.gather_object((total, stats), gathered, dst=0)
        if not self.is_main:
            return {}
        merged: dict[str, torch.Tensor] = {}
        for k, (part, _) in enumerate(gathered):
            add_metrics(merged, part, stage_prefix(k, self.world))
        self.worker_stats = [s for _, s in gathered]
        return averages(merged, run.samples)

    def begin_epoch(self, plan: EpochPlan) -> None:
        self.stage.begin_epoch(plan)

    @torch.no_grad()
    def refresh(self, loader: TensorLoader) -> None:
        with autocast_of(self.stages):
            self._refresh(loader)

    def _refresh(self, loader: TensorLoader) -> None:
        """A forward pass along the chain (its traffic counts towards the next epoch's)."""
        self.stage.train(True)
        for batch in loader:
            h = self.stage.refresh_step(self._input(batch, FORWARD, self.stage.wire.in_shape), batch.idx)
            if not self.last:
                self.channel.send(h, self.rank + 1, FORWARD, self.activations)

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loader: TensorLoader) -> EvalOutput | None:
        with autocast_of(self.stages):
            return self._evaluate(loader)

    def _evaluate(self, loader: TensorLoader) -> EvalOutput | None:
        self.stage.train(False)
        logits, labels = [], []
        for batch in loader:
            h, aux = self.stage.eval_forward(self._input(batch, EVAL, self.in_shape))
            if not self.last:
                self.channel.send(h, self.rank + 1, EVAL, self.activations)
            mine = h if self.last else aux
            if mine is not None:
                logits.append(mine.float().cpu())
            labels.append(batch.y.cpu())
        self.channel.flush()
        self.channel.take_counters()  # evaluation traffic is not training traffic
        mine = torch.cat(logits) if logits else None
        gathered = [None] * self.world if self.is_main else None
        dist.gather_object(mine, gathered, dst=0)
        return EvalOutput(torch.cat(labels), gathered) if self.is_main else None


def num_groups(cfg: Experiment) -> int:
    return len(cfg.model.split) + 1 if cfg.model.split else cfg.model.groups


def worker_device(device: torch.device, local_rank: int) -> torch.device:
    """A bare 'cuda' given for every worker means one GPU per worker of this machine, by local rank."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return device


def run_worker(cfg: Experiment, rank: int, world: int, local_rank: int, init_method: str, job):
    """Join the process group, build this worker's stage, and run `job(prepared, runtime, console)`."""
    named = group_devices(cfg, world)  # parsed and checked once; every worker finds the same problem
    device = worker_device(named[rank], local_rank)
    devices = [worker_device(d, r) for r, d in enumerate(named)]
    # NCCL needs one rank per GPU; ranks that share a GPU, or run on CPU, talk over gloo.
    backend = "nccl" if device.type == "cuda" and len(set(devices)) == world else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=120)
    if init_method.startswith("store://"):  # the launcher's store: its port was never let go (no race)
        port = int(init_method.rsplit(":", 1)[1])
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout)
    try:
        torch.set_num_threads(cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // world))
        if cfg.model.balance == "time" and not cfg.model.split and cfg.model.groups > 1:
            # timings differ between processes: rank 0 chooses the cut for everyone
            split = group_split_names(prepare(cfg, check_devices=False).groups) if rank == 0 else None
            box = [split]
            dist.broadcast_object_list(box, src=0)
            cfg = replace(cfg, model=replace(cfg.model, split=box[0]))
        p = prepare(cfg, check_devices=False)
        if cfg.data_parallel:  # every worker a replica of the whole model
            from lctrun.runtime.data_parallel import DataParallelRuntime

            runtime = DataParallelRuntime(p.method, build_stage(p, 0, device))
            result = job(p, runtime, Console() if rank == 0 else Console(quiet=True))
            runtime.close()  # DDP's reducer holds the process group: gone before destroy_process_group
            del runtime
            gc.collect()
            return result
        if len(p.groups) != world:
            fix = (
                f"start torchrun with --nnodes x --nproc_per_node = {len(p.groups)}"
                if init_method == "env://"
                else f"set workers={len(p.groups)}"
            )
            raise ConfigError(
                f"runtime=distributed runs one worker per group: {world} workers but the cut gives "
                f"{len(p.groups)} groups ({fix}, or change model.split/model.groups)"
            )
        stage = build_stage(p, rank, device)
        runtime = DistributedRuntime(p.method, stage, p.shapes, cfg.memory_format == "channels_last")
        return job(p, runtime, Console() if rank == 0 else Console(quiet=True))
    finally:
        dist.destroy_process_group()


@dataclass
class WorkerBody:
    """What each spawned worker process runs: join the local process group, then the job."""

    cfg: Experiment
    world: int
    port: int  # of the launcher's TCPStore
    job: object

    def __call__(self, rank: int):
        return run_worker(self.cfg, rank, self.world, rank, f"store://127.0.0.1:{self.port}", self.job)


def check_groups_fit(cfg: Experiment) -> None:
    """model.groups larger than the model's blocks: said now, before K processes start and load the data."""
    from lctrun.data import input_shape
    from lctrun.models import build_model

    shape = input_shape(cfg.data)
    if cfg.model.split or cfg.model.groups <= 1 or shape is None:
        return
    blocks = len(build_model(cfg.model.name, cfg.data.num_classes, shape).block_names())
    if cfg.model.groups > blocks:
        raise ConfigError(
            f"model.groups={cfg.model.groups} but {cfg.model.name} has only {blocks} blocks to cut between: "
            f"use model.groups <= {blocks}"
        )


def spawn_workers(cfg: Experiment, job, where="", console: Console | None = None):
    """Start one local process per group, run `job` in each, return rank 0's result."""
    check_groups_fit(cfg)
    world = cfg.workers or num_groups(cfg)
    # the launcher holds the rendezvous store on a port the OS picked, for as long as the workers run
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    try:
        return run_processes(WorkerBody(cfg, world, store.port, job), world, "worker", where, console)
    finally:
        del store
