"""Do K one-thread workers on this machine slow each other? The projection assumes they do not (a device's
profile, taken alone, prices its compute whatever its neighbours do), so this checks it.

A model's training step (forward, backward, SGD step) on one thread, timed alone, then in K processes at once,
each on its own batch, as K data-parallel replicas or K pipeline stages computing together would run:

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736 \
        .venv/bin/python scripts/concurrent_compute.py --model resnet20 --batch 64 --workers 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch
import torch.nn.functional as F

from lctrun.models import build_model


def step_ms(model: str, batch: int, steps: int, start=None) -> float:
    """Median milliseconds of a training step on one thread, after a warm-up step (and `start`, if given)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = build_model(model, 10, (3, 32, 32))
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(net.parameters(), lr=1e-9, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
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


def worker(args, start, results, rank: int) -> None:
    results[rank] = step_ms(args.model, args.batch, args.steps, start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    alone = step_ms(args.model, args.batch, args.steps)
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(args.workers), ctx.Array("d", args.workers)
    procs = [ctx.Process(target=worker, args=(args, start, results, r)) for r in range(args.workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    together = list(results)
    print(f"{args.model}, batch {args.batch}, one thread per worker, median of {args.steps} steps")
    print(f"alone: {alone:.1f} ms per step")
    print(f"{args.workers} at once: {', '.join(f'{t:.1f}' for t in together)} ms per step")
    print(f"slowdown: {max(together) / alone:.3f}x (1 = the workers do not slow each other)")


if __name__ == "__main__":
    main()
