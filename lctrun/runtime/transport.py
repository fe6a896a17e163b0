"""Point-to-point messages between neighbouring workers over torch.distributed, with counters.

Plain isend/irecv (batch_isend_irecv has been unreliable on gloo). Sends are asynchronous: the
tensor is kept alive until its send completes. gloo moves CPU tensors only, so on gloo a CUDA
tensor is staged through host memory.
"""

from __future__ import annotations

import time
from collections import deque

import torch
import torch.distributed as dist

FORWARD, BACKWARD, EVAL = 1, 2, 3  # message tags: one kind per direction between two neighbours


class Channel:
    def __init__(self, device: torch.device, max_pending_sends: int = 4):
        self.device = device
        self.stage_via_cpu = dist.get_backend() == "gloo"
        self.sends: deque = deque()
        self.max_pending_sends = max_pending_sends
        self.bytes_sent = 0
        self.bytes_received = 0
        self.wait_seconds = 0.0

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        tensor = tensor.detach()
        if self.stage_via_cpu:
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        self.sends.append((dist.isend(tensor, dst, tag=tag), tensor))
        self.bytes_sent += tensor.numel() * tensor.element_size()
        while self.sends and self.sends[0][0].is_completed():  # free finished sends' buffers now
            self.sends.popleft()
        while len(self.sends) > self.max_pending_sends:
            self._wait_oldest_send()

    def recv(self, shape: tuple[int, ...], src: int, tag: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype, device="cpu" if self.stage_via_cpu else self.device)
        start = time.perf_counter()
        dist.irecv(buffer, src, tag=tag).wait()
        self.wait_seconds += time.perf_counter() - start
        self.bytes_received += buffer.numel() * buffer.element_size()
        return buffer.to(self.device, non_blocking=True)

    def _wait_oldest_send(self) -> None:
        work, _ = self.sends.popleft()
        start = time.perf_counter()
        work.wait()
        self.wait_seconds += time.perf_counter() - start

    def flush(self) -> None:
        while self.sends:
            self._wait_oldest_send()

    def take_counters(self) -> dict[str, float]:
        out = {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received, "wait_s": self.wait_seconds}
        self.bytes_sent = self.bytes_received = 0
        self.wait_seconds = 0.0
        return out
