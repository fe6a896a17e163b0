"""Do K one-thread workers on one machine slow each other? A device's profile is taken alone, so the projection
prices its compute as if nothing ran beside it: right for separate devices, not for cores of one CPU, which
share its caches and memory bandwidth. This measures the factor the check's timeline needs (timeline.colocated):
a training step (forward, backward, SGD step) on one thread, timed alone, then in K processes at once, each on
its own batch, as K data-parallel replicas or pipeline stages computing together run; in the run's precision
and memory format, since bf16 kernels load the caches and memory differently from fp32 ones.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time

import torch
import torch.nn.functional as F

from lctrun.models import build_model
from lctrun.precision import autocast, memory_format, to_memory_format


def step_ms(
    model: str,
    shape: tuple[int, ...],
    batch: int,
    steps: int,
    start=None,
    precision: str = "fp32",
    layout: str = "contiguous",
) -> float:
    """Median milliseconds of a training step on one thread, after a warm-up step (and `start`, if given), in
    `precision` with the model and batch in the memory format `layout`."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = to_memory_format(build_model(model, 10, tuple(shape)), layout)
    x, y = torch.randn(batch, *shape).contiguous(memory_format=memory_format(layout)), torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(net.parameters(), lr=1e-9, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(precision, ["cpu"]):
            logits = net(x)
        F.cross_entropy(logits.float(), y).backward()
        opt.step()

    step()
    if start is not None:
        start.wait()  # every worker starts its timed steps together
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    return 1000 * statistics.median(times)


def _worker(model, shape, batch, steps, start, precision, layout, results, rank: int) -> None:
    results[rank] = step_ms(model, shape, batch, steps, start, precision, layout)


def together_ms(
    model: str,
    shape: tuple[int, ...],
    batch: int,
    workers: int,
    steps: int,
    precision: str = "fp32",
    layout: str = "contiguous",
) -> list[float]:
    """Each of `workers` processes' median step, all stepping at once."""
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(workers), ctx.Array("d", workers)
    args = (model, tuple(shape), batch, steps, start, precision, layout, results)
    procs = [ctx.Process(target=_worker, args=(*args, r)) for r in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"co-location timing: worker(s) {failed} failed (exit codes {[p.exitcode for p in procs]})")
    return list(results)


def slowdown(
    model: str,
    shape: tuple[int, ...],
    batch: int,
    workers: int,
    steps: int = 12,
    precision: str = "fp32",
    layout: str = "contiguous",
) -> float:
    """How many times slower the slowest of `workers` one-thread workers steps when all step at once than one
    alone (1: they do not slow each other)."""
    alone = step_ms(model, shape, batch, steps, None, precision, layout)
    return max(together_ms(model, shape, batch, workers, steps, precision, layout)) / alone
