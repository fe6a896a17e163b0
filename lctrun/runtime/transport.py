"""Point-to-point messages between neighbouring workers over torch.distributed, with counters.

Plain isend/irecv (batch_isend_irecv has been unreliable on gloo). Sends are asynchronous: the
tensor is kept alive until its send completes. gloo moves CPU tensors only, so on gloo a CUDA
tensor is staged through host memory. A message travels in the dtype both ends give (Wire.dtype,
Wire.feedback_dtype: bf16 activations under bf16 autocast), and a channels-last channel moves 4-D
messages as NHWC bytes, so that they arrive channels-last without a copy on either side.
"""

from __future__ import annotations

import time
from collections import deque

import torch
import torch.distributed as dist

FORWARD, BACKWARD, EVAL = 1, 2, 3  # message tags: one kind per direction between two neighbours
CONTROL = 4  # one flag per training step along the chain: does the epoch stop here (Ctrl-C)?


class Channel:
    def __init__(self, device: torch.device, max_pending_sends: int = 4, channels_last: bool = False):
        self.device = device
        self.channels_last = channels_last
        self.stage_via_cpu = dist.get_backend() == "gloo"
        self.sends: deque = deque()
        self.max_pending_sends = max_pending_sends
        self.bytes_sent = 0
        self.bytes_received = 0
        self.wait_seconds = 0.0
        self.flags: deque = deque()  # control sends in flight: never waited on per step, not counted as traffic

    def send(self, tensor: torch.Tensor, dst: int, tag: int, dtype: torch.dtype = torch.float32) -> None:
        tensor = tensor.detach().to(dtype)
        if self.stage_via_cpu:
            tensor = tensor.cpu()
        tensor = self._wire_layout(tensor).contiguous()  # a no-op for a channels-last tensor on a channels-last wire
        self.sends.append((dist.isend(tensor, dst, tag=tag), tensor))
        self.bytes_sent += tensor.numel() * tensor.element_size()
        while self.sends and self.sends[0][0].is_completed():  # free finished sends' buffers now
            self.sends.popleft()
        while len(self.sends) > self.max_pending_sends:
            self._wait_oldest_send()

    def recv(self, shape: tuple[int, ...], src: int, tag: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.take(self.post(shape, src, tag, dtype))

    def post(self, shape: tuple[int, ...], src: int, tag: int, dtype: torch.dtype = torch.float32) -> tuple:
        """Start receiving a message, to `take` later: the transfer can run while this worker computes
        (receives from one source with one tag complete in the order they were posted)."""
        device = "cpu" if self.stage_via_cpu else self.device
        if self.channels_last and len(shape) == 4:
            n, c, h, w = shape
            buffer = torch.empty((n, h, w, c), dtype=dtype, device=device).permute(0, 3, 1, 2)
        else:
            buffer = torch.empty(shape, dtype=dtype, device=device)
        return dist.irecv(self._wire_layout(buffer), src, tag=tag), buffer

    def take(self, posted: tuple) -> torch.Tensor:
        work, buffer = posted
        start = time.perf_counter()
        work.wait()
        self.wait_seconds += time.perf_counter() - start
        self.bytes_received += buffer.numel() * buffer.element_size()
        return buffer.to(self.device, non_blocking=True)

    def _wire_layout(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor as its bytes travel: NCHW viewed as NHWC on a channels-last channel."""
        return tensor.permute(0, 2, 3, 1) if self.channels_last and tensor.dim() == 4 else tensor

    def send_flag(self, flag: bool, dst: int) -> None:
        tensor = torch.tensor([float(flag)], device="cpu" if self.stage_via_cpu else self.device)
        self.flags.append((dist.isend(tensor, dst, tag=CONTROL), tensor))
        while self.flags and self.flags[0][0].is_completed():
            self.flags.popleft()

    def recv_flag(self, src: int) -> bool:
        buffer = torch.empty(1, device="cpu" if self.stage_via_cpu else self.device)
        start = time.perf_counter()
        dist.irecv(buffer, src, tag=CONTROL).wait()
        self.wait_seconds += time.perf_counter() - start
        return bool(buffer.item())

    def _wait_oldest_send(self) -> None:
        work, _ = self.sends.popleft()
        start = time.perf_counter()
        work.wait()
        self.wait_seconds += time.perf_counter() - start

    def flush(self) -> None:
        while self.sends:
            self._wait_oldest_send()
        while self.flags:
            self.flags.popleft()[0].wait()

    def add_counters(self, counters: dict[str, float]) -> None:
        """Continue counting from `counters` (what take_counters gave before a stop inside the epoch)."""
        self.bytes_sent += counters["bytes_sent"]
        self.bytes_received += counters["bytes_received"]
        self.wait_seconds += counters["wait_s"]

    def take_counters(self) -> dict[str, float]:
        out = {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received, "wait_s": self.wait_seconds}
        self.bytes_sent = self.bytes_received = 0
        self.wait_seconds = 0.0
        return out
