"""The links a projection joins its K devices with: this machine's gloo between two local processes (measured),
and named presets for GPU links, each with the figures it uses."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from datetime import timedelta

from lctrun.errors import ConfigError
from lctrun.projection.timeline import Link

# Effective one-way point-to-point figures (not the marketing peak): PCIe 4.0 x16 is 31.5 GB/s per direction
# raw, about 24 GB/s in NCCL's p2p tests; NVLink 3 (A100, through NVSwitch) 300 GB/s per direction raw, about
# 230 GB/s measured. Latencies: a few microseconds of NCCL's launch and protocol per message.
PRESETS = {
    "pcie4": Link(24e9, 10e-6, "pcie4 (PCIe 4.0 x16, effective)"),
    "nvlink": Link(230e9, 5e-6, "nvlink (NVLink 3 via NVSwitch, effective)"),
}


@dataclass
class PingPong:
    """Rank 0 and rank 1 send a tensor back and forth: one-way seconds for a small and a large message."""

    port: int
    small: int = 1
    large: int = 4 * 2**20  # floats (16 MB)
    rounds: int = 20

    def __call__(self, rank: int):
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", self.port, is_master=False, timeout=timedelta(seconds=60))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=60))
        try:
            seconds = []
            for size in (self.small, self.large):
                x = torch.zeros(size)
                rounds = []
                for _ in range(self.rounds + 2):  # the first two warm up
                    start = time.perf_counter()
                    if rank == 0:
                        dist.send(x, 1)
                        dist.recv(x, 1)
                    else:
                        dist.recv(x, 0)
                        dist.send(x, 0)
                    rounds.append((time.perf_counter() - start) / 2)
                seconds.append(statistics.median(rounds[2:]))  # a shared machine: the median, not the mean
            return seconds
        finally:
            dist.destroy_process_group()


def measure_gloo() -> Link:
    """Latency from a 4-byte message, bandwidth from the extra time of a 16 MB one (two local processes)."""
    import torch.distributed as dist

    from lctrun.runtime.processes import run_processes

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    try:
        probe = PingPong(store.port)
        small_s, large_s = run_processes(probe, 2, "link probe")
    finally:
        del store
    nbytes = 4 * (probe.large - probe.small)
    return Link(nbytes / max(large_s - small_s, 1e-9), small_s, "gloo (measured: two local processes)")


def link_named(name: str) -> Link:
    if name == "gloo":
        return measure_gloo()
    if name not in PRESETS:
        raise ConfigError(f"--links {name}: not a link (known: gloo, {', '.join(PRESETS)})")
    return PRESETS[name]
