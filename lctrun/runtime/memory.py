"""Peak memory of this process above its own baseline (CUDA: allocator peak; CPU: peak RSS)."""

from __future__ import annotations

import torch


def _status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def release_free_heap() -> None:
    """Give freed heap back to the OS (glibc), so that memory freed during start-up, which training
    could reuse without growing RSS, is not counted in the baseline."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Resets the peak after start-up (importing torch, loading data) so that only training counts."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        release_free_heap()
        try:  # writing 5 to clear_refs resets VmHWM to the current RSS (Linux)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.baseline = _status_kb("VmRSS") * 1024

    def peak_bytes(self) -> int:
        """Peak since the last reset, above the baseline at that reset."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        return max(_status_kb("VmHWM") * 1024 - self.baseline, 0)


class PeakMemoryOf:
    """The peaks of several devices (a serial run's groups may sit on different GPUs), added up; the host
    (CPU) once however many groups it holds."""

    def __init__(self, devices: list[torch.device]):
        self.meters = [PeakMemory(d) for d in dict.fromkeys(torch.device(d) for d in devices)]

    def peak_bytes(self) -> int:
        return sum(m.peak_bytes() for m in self.meters)
