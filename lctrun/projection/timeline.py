"""A discrete-event timeline of training schedules on K devices joined by links: no closed formulas.

Each device runs a program, a list of operations in order (what the worker's code does, in its order). An
operation waits for the events it needs (a message's arrival, or an earlier operation) and for its device:
`Compute` occupies the device for its seconds; `Send` puts bytes on the link from its device to another, which
is busy for bytes / bandwidth (one message after another, each direction its own link) and delivers latency
later; the sender goes on at once (isend). A program may belong to a stream that does not compute (a
communication thread: data-parallel all-reduce), so its waits do not stall the device's compute.

Devices that are cores of one machine may slow each other while they compute at the same time (`colocated`,
a measured factor); separate devices do not, and that is the default.

The schedules below build the programs of each training configuration lctrun runs, from per-stage costs of one
batch (or micro-batch): layer-serial bp, GPipe and 1F1B, data-parallel bp with a ring all-reduce, lct/dgl/dni at
pipeline depth D, and the parallel phase of penalty/al. They follow the order of lctrun's code (the runtime in
runtime/distributed.py, the stages in methods/), e.g. bp's gradient leaves a stage after its optimiser step,
because the stage returns it from feedback() after update().
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Link:
    """A point-to-point link, one per direction between two devices."""

    bandwidth: float  # bytes per second
    latency: float  # seconds from the end of the transfer to the arrival
    name: str = ""

    def describe(self) -> str:
        return f"{self.name or 'link'}: {self.bandwidth / 1e9:.3g} GB/s, {self.latency * 1e6:.3g} us latency"


FREE = Link(float("inf"), 0.0, "free")  # no transfer cost: the textbook results


@dataclass(frozen=True)
class Compute:
    name: Hashable  # the event it produces when done
    seconds: float
    needs: tuple = ()


@dataclass(frozen=True)
class Send:
    name: Hashable  # the event of its arrival
    to: Hashable  # the destination device
    nbytes: float
    needs: tuple = ()


@dataclass
class Timeline:
    """Plays programs {program: [operations]}; a program runs on device `device_of(program)`."""

    link: Link = FREE
    seconds: dict = field(default_factory=dict)  # Compute name -> its seconds, where not the operation's own
    done: dict = field(default_factory=dict)  # event -> time
    spans: list = field(default_factory=list)  # (device, name, start, end) of every Compute

    def play(self, programs: dict[Hashable, list], device_of=lambda program: program) -> float:
        """Run every program to its end; returns the time the last event happens."""
        position = dict.fromkeys(programs, 0)
        busy: dict = {}  # device (or link (src, dst)) -> when it is free
        progress = True
        while progress:
            progress = False
            for program, ops in programs.items():
                device = device_of(program)
                while position[program] < len(ops):
                    op = ops[position[program]]
                    if any(need not in self.done for need in op.needs):
                        break
                    ready = max([busy.get(program, 0.0), *(self.done[n] for n in op.needs)])
                    if isinstance(op, Compute):
                        start = max(ready, busy.get(device, 0.0))
                        end = busy[device] = busy[program] = start + self.seconds.get(op.name, op.seconds)
                        self.spans.append((device, op.name, start, end))
                        self.done[op.name] = end
                    else:
                        route = (device, op.to)
                        start = max(ready, busy.get(route, 0.0))
                        busy[route] = start + op.nbytes / self.link.bandwidth
                        busy[program] = ready  # isend: the program goes on
                        self.done[op.name] = busy[route] + self.link.latency
                    position[program] += 1
                    progress = True
        stuck = [p for p, ops in programs.items() if position[p] < len(ops)]
        if stuck:
            op = programs[stuck[0]][position[stuck[0]]]
            missing = [n for n in op.needs if n not in self.done]
            raise RuntimeError(f"schedule deadlocks: program {stuck[0]} waits for {missing} at {op.name}")
        return max(self.done.values(), default=0.0)

    def in_flight(self, device: Hashable) -> int:
        """Most micro-batches whose forward has started on `device` and whose backward has not ended
        (operations named ("f" | "b", device, batch, micro-batch, ...))."""
        changes = []
        for dev, name, start, end in self.spans:
            if dev == device and isinstance(name, tuple) and name[0] in ("f", "b"):
                changes.append((start, 1) if name[0] == "f" else (end, -1))
        count = most = 0
        for _, change in sorted(changes, key=lambda c: (c[0], c[1])):
            count += change
            most = max(most, count)
        return most


@dataclass(frozen=True)
class StageCost:
    """Seconds of one stage on one batch (or micro-batch), and the bytes of its forward message per batch."""

    forward: float
    backward: float
    optimizer: float = 0.0  # the group's optimiser step (once per batch)
    aux_forward: float = 0.0  # critic / head / synthesizer forward, within the group's step
    aux_backward: float = 0.0  # backward through it into the group's output, within the group's step
    aux_update: float = 0.0  # lct / dni: the auxiliary net's own update, when the next group's feedback arrives
    out_bytes: float = 0.0  # forward message (the group's output), per batch
    param_bytes: float = 0.0  # gradient bytes of the group (data-parallel all-reduce)


def layer_serial_bp(stages: list[StageCost], batches: int) -> dict:
    """Model-parallel bp: forward down the chain, backward up it; each stage steps, then sends its gradient."""
    k_last = len(stages) - 1
    programs: dict = {k: [] for k in range(len(stages))}
    for t in range(batches):
        for k, s in enumerate(stages):
            ops = programs[k]
            ops.append(Compute(("f", k, t, 0), s.forward, (("h", k - 1, t),) if k else ()))
            if k < k_last:
                ops.append(Send(("h", k, t), k + 1, s.out_bytes, (("f", k, t, 0),)))
            grad = () if k == k_last else (("g", k + 1, t),)
            ops.append(Compute(("b", k, t, 0), s.backward + s.optimizer, grad))
            if k:
                ops.append(Send(("g", k, t), k - 1, stages[k - 1].out_bytes, (("b", k, t, 0),)))
    return programs


def pipelined_bp(stages: list[StageCost], microbatches: int, batches: int, schedule: str = "gpipe") -> dict:
    """bp over M micro-batches (`stages`: the costs of one micro-batch; the optimiser's is per batch) in
    torch.distributed.pipelining's order: GPipe, every forward then every backward; 1F1B, K - k forwards
    (stage k, from 0) then one backward and one forward in turn, then the remaining backwards."""
    k_last, m_count = len(stages) - 1, microbatches
    programs: dict = {k: [] for k in range(len(stages))}
    for t in range(batches):
        for k, s in enumerate(stages):
            if schedule == "gpipe":
                order = [("f", m) for m in range(m_count)] + [("b", m) for m in range(m_count)]
            elif schedule == "1f1b":
                warmup = min(m_count, len(stages) - k)
                order = [("f", m) for m in range(warmup)]
                for m in range(m_count - warmup):
                    order += [("b", m), ("f", warmup + m)]
                order += [("b", m) for m in range(m_count - warmup, m_count)]
            else:
                raise ValueError(f"unknown schedule {schedule!r}: gpipe or 1f1b")
            ops = programs[k]
            for kind, m in order:
                if kind == "f":
                    ops.append(Compute(("f", k, t, m), s.forward, (("h", k - 1, t, m),) if k else ()))
                    if k < k_last:
                        ops.append(Send(("h", k, t, m), k + 1, s.out_bytes, (("f", k, t, m),)))
                else:
                    needs = (("f", k, t, m),) + (() if k == k_last else (("g", k + 1, t, m),))
                    ops.append(Compute(("b", k, t, m), s.backward, needs))
                    if k:
                        ops.append(Send(("g", k, t, m), k - 1, stages[k - 1].out_bytes, (("b", k, t, m),)))
            ops.append(Compute(("o", k, t), s.optimizer))
    return programs


def data_parallel_bp(blocks: list[StageCost], workers: int, batches: int, bucket_bytes: float = 25 * 2**20) -> dict:
    """K replicas, each on 1/K of the batch (`blocks`: every block's cost at that size): forward, then backward
    block by block from the last; each bucket of gradients (DDP's, filled from the last block) is all-reduced
    as soon as it is full, by a ring (2 (K-1) rounds of 1/K of the bucket per link) on a communication stream
    that overlaps the rest of the backward; the optimiser steps once every bucket is reduced."""
    buckets, size = [[]], 0.0  # block indices, from the last
    for i in reversed(range(len(blocks))):
        if buckets[-1] and size + blocks[i].param_bytes > bucket_bytes:
            buckets.append([])
            size = 0.0
        buckets[-1].append(i)
        size += blocks[i].param_bytes
    programs: dict = {}
    for r in range(workers):
        ops, comm = programs.setdefault(r, []), programs.setdefault(("comm", r), [])
        for t in range(batches):
            ops.append(Compute(("f", r, t, 0), sum(b.forward for b in blocks)))
            reduced = []
            for j, bucket in enumerate(buckets):
                ops.append(Compute(("b", r, t, j), sum(blocks[i].backward for i in bucket)))
                chunk = sum(blocks[i].param_bytes for i in bucket) / workers
                for step in range(2 * (workers - 1)):
                    needs = (("b", r, t, j),) + ((("ar", (r - 1) % workers, t, j, step - 1),) if step else ())
                    comm.append(Send(("ar", r, t, j, step), (r + 1) % workers, chunk, needs))
                if workers > 1:
                    reduced.append(("ar", (r - 1) % workers, t, j, 2 * (workers - 1) - 1))
            ops.append(Compute(("o", r, t), sum(b.optimizer for b in blocks), tuple(reduced)))
    return programs


def device_of(program) -> Hashable:
    """The device a program runs on: a communication stream ("comm", r) on device r."""
    return program[1] if isinstance(program, tuple) and program[0] == "comm" else program


LOCAL_FEEDBACK = {"lct": "loss", "dgl": None, "dni": "grad"}


def local_method(stages: list[StageCost], method: str, depth: int, batches: int, loss_bytes: float) -> dict:
    """lct, dgl or dni on K workers at pipeline depth D (as runtime/distributed.py runs them).

    Stage k < K: its group's forward and its auxiliary net's forward; the forward message leaves then (emit),
    and lct's per-sample loss goes back to stage k-1 at the same time; then the backward (through the
    auxiliary net, then the group) and the optimiser step; dni's input gradient goes back after the step.
    The last stage: forward, (lct: its loss goes back), backward, step (dni: its gradient goes back).
    After its step on batch t, stage k < K takes the feedback of batch t - D + 1 (lct: the next stage's loss;
    dni: its input gradient), and updates its critic or synthesizer with it: at D = 1 it waits for the batch's
    own feedback before its next step. dgl has no feedback and never waits for a later stage."""
    feedback = LOCAL_FEEDBACK[method]
    k_last = len(stages) - 1
    programs: dict = {k: [] for k in range(len(stages))}
    for t in range(batches + depth - 1):
        for k, s in enumerate(stages):
            ops = programs[k]
            if t < batches:
                fwd = ("fa", k, t)
                ops.append(
                    Compute(fwd, s.forward + (s.aux_forward if k < k_last else 0), (("h", k - 1, t),) if k else ())
                )
                if k < k_last:
                    ops.append(Send(("h", k, t), k + 1, s.out_bytes, (fwd,)))
                if feedback == "loss" and k:
                    ops.append(Send(("fb", k, t), k - 1, loss_bytes, (fwd,)))
                aux_back = s.aux_backward if k < k_last else 0.0
                ops.append(Compute(("step", k, t), aux_back + s.backward + s.optimizer))
                if feedback == "grad" and k:
                    ops.append(Send(("fb", k, t), k - 1, stages[k - 1].out_bytes, (("step", k, t),)))
            owed = t - depth + 1  # the batch whose feedback stage k takes now
            if feedback and k < k_last and 0 <= owed < batches:
                ops.append(Compute(("aux", k, owed), s.aux_update, (("fb", k + 1, owed),)))
    return programs


def layer_parallel(stages: list[StageCost], depth: int, batches: int, target_bytes: list[float]) -> dict:
    """The parallel phase of penalty / al (wire order "backward"): stage k < K takes stage k+1's target for a
    batch before it steps it, then sends its own target to stage k-1 and its output phi to stage k+1, which
    stores it up to D batches later. `target_bytes[k]`: stage k's target message per batch (the cut's state,
    filtered), also the size of phi."""
    k_last = len(stages) - 1
    programs: dict = {k: [] for k in range(len(stages))}
    for t in range(batches + depth):
        for k, s in enumerate(stages):
            ops = programs[k]
            if t < batches:
                needs = () if k == k_last else (("target", k + 1, t),)
                ops.append(Compute(("step", k, t), s.forward + s.backward + s.optimizer, needs))
                if k:
                    ops.append(Send(("target", k, t), k - 1, target_bytes[k - 1], (("step", k, t),)))
                if k < k_last:
                    ops.append(Send(("phi", k, t), k + 1, target_bytes[k], (("step", k, t),)))
            stored = t - depth
            if k and 0 <= stored < batches:
                ops.append(Compute(("store", k, stored), 0.0, (("phi", k - 1, stored),)))
    return programs


def makespan(programs: dict, link: Link = FREE, slowdown: float = 1.0) -> float:
    return colocated(programs, link, slowdown).play(programs, device_of)


def busy_elsewhere(spans: list, device, start: float, end: float) -> float:
    """Seconds within [start, end] during which a device other than `device` computes."""
    others = sorted((max(s, start), min(e, end)) for d, _, s, e in spans if d != device and s < end and e > start)
    covered, reach = 0.0, start
    for s, e in others:
        if e > reach:
            covered += e - max(s, reach)
            reach = e
    return covered


def colocated(programs: dict, link: Link = FREE, slowdown: float = 1.0, rounds: int = 50) -> Timeline:
    """A timeline whose devices share one machine: a Compute runs `slowdown` times slower while another device
    computes (cores of one CPU contending for its caches and memory bandwidth). Played to a fixed point: each
    round gives every Compute its work at full speed outside the overlap the previous round found and at
    1/slowdown inside it (stretching one by s seconds stretches the others by at most s (1 - 1/slowdown), so
    the rounds settle). slowdown = 1: separate devices, one play."""
    timeline = Timeline(link)
    if slowdown == 1.0:
        return timeline
    base = {op.name: op.seconds for ops in programs.values() for op in ops if isinstance(op, Compute)}
    for _ in range(rounds):
        trial = Timeline(link, dict(timeline.seconds))
        trial.play(programs, device_of)
        stretched = {  # its work at full speed outside the overlap, at 1/slowdown inside it
            name: base[name] + busy_elsewhere(trial.spans, device, start, end) * (1 - 1 / slowdown)
            for device, name, start, end in trial.spans
        }
        settled = all(abs(stretched[n] - trial.seconds.get(n, base[n])) <= 1e-9 * (1 + base[n]) for n in stretched)
        timeline = Timeline(link, stretched)
        if settled:
            break
    return timeline


def steady_seconds_per_batch(build, link: Link = FREE, batches: int = 12, slowdown: float = 1.0) -> float:
    """Seconds per batch once the pipeline is full: the difference between `batches` and batches // 2 batches
    (build(n) gives the programs of n batches), so that filling and draining cancel."""
    half = batches // 2
    return (makespan(build(batches), link, slowdown) - makespan(build(half), link, slowdown)) / (batches - half)
