"""Do K one-thread workers on this machine slow each other? (lctrun/projection/colocation.py says why it matters)

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736 \
        .venv/bin/python scripts/concurrent_compute.py --model resnet20 --batch 64 --workers 2
"""

import argparse

from lctrun.projection.colocation import step_ms, together_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    shape = (3, 32, 32)
    alone = step_ms(args.model, shape, args.batch, args.steps)
    together = together_ms(args.model, shape, args.batch, args.workers, args.steps)
    print(f"{args.model}, batch {args.batch}, one thread per worker, median of {args.steps} steps")
    print(f"alone: {alone:.1f} ms per step")
    print(f"{args.workers} at once: {', '.join(f'{t:.1f}' for t in together)} ms per step")
    print(f"slowdown: {max(together) / alone:.3f}x (1 = the workers do not slow each other)")


if __name__ == "__main__":
    main()
